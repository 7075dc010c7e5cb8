"""KL calibration: the shared-prefix sweep, the criterion, the record and the script."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import collate, singles
from reference_loop import reference_logits

from vtw_train.calibration import (
    CalibrationConfig,
    CalibrationRecord,
    calibrate,
    kl_per_sample,
    target_positions,
)
from vtw_train.engine.sweep import exit_sweep
from vtw_train.tiny_models import tiny_model

FAMILIES = ["llava", "llava_next", "qwen2_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def model_and_samples(request):
    model = tiny_model(request.param, num_layers=5).eval()
    samples = singles(model, [dict(), dict(seed=11), dict(seed=12)])
    return model, samples


def test_sweep_matches_reference_at_every_exit(model_and_samples):
    model, samples = model_and_samples
    batch = collate(samples, "left")
    last = batch["input_ids"].shape[1] - 1
    states = exit_sweep(model, batch, list(range(6)), torch.full((3, 1), last))
    head = model.get_output_embeddings()
    for k in range(6):
        logits = head(states[k])[:, 0]
        for i, sample in enumerate(samples):
            expected, _ = reference_logits(model, sample, k if k < 5 else None)
            torch.testing.assert_close(logits[i], expected[0, -1], rtol=1e-5, atol=1e-5)
    # withdrawal must matter, or the comparison above proves nothing
    assert not torch.allclose(head(states[0]), head(states[5]), atol=1e-3)


def test_kl_is_the_vtw_direction_and_zero_at_full(model_and_samples):
    model, samples = model_and_samples
    sample = samples[0]
    kls = kl_per_sample(model, sample, [0, 2, 5], "first_token")
    assert kls[5].item() == pytest.approx(0.0, abs=1e-6)
    full, _ = reference_logits(model, sample, None)
    exited, _ = reference_logits(model, sample, 2)
    p_exit = F.softmax(exited[0, -1], -1)
    expected = (p_exit * (F.log_softmax(exited[0, -1], -1) - F.log_softmax(full[0, -1], -1))).sum()
    assert kls[2].item() == pytest.approx(expected.item(), rel=1e-4)
    assert kls[0].item() > 0


def test_answer_mean_averages_answer_positions():
    model = tiny_model("llava", num_layers=4).eval()
    sample = singles(model, [dict(text_length=12)])[0]
    answer = torch.tensor([[40, 41, 42]])  # an answer after the prompt, as in teacher forcing
    sample = {
        "input_ids": torch.cat([sample["input_ids"], answer], 1),
        "attention_mask": torch.ones(1, sample["input_ids"].shape[1] + 3, dtype=torch.long),
        "pixel_values": sample["pixel_values"],
    }
    labels = torch.full_like(sample["input_ids"], -100)
    labels[0, -3:] = sample["input_ids"][0, -3:]
    batch = dict(sample, labels=labels)
    positions, valid = target_positions(batch, "answer_mean")
    n = sample["input_ids"].shape[1]
    assert positions.tolist() == [[n - 4, n - 3, n - 2]] and bool(valid.all())
    first, _ = target_positions(batch, "first_token")
    assert first.tolist() == [[n - 4]]
    mean = kl_per_sample(model, batch, [1], "answer_mean")[1]
    full, idx = reference_logits(model, sample, None)
    exited, _ = reference_logits(model, sample, 1)
    rows = [int((idx == p).nonzero()) for p in positions[0]]
    lp_exit, lp_full = F.log_softmax(exited[0, rows], -1), F.log_softmax(full[0, rows], -1)
    expected = (lp_exit.exp() * (lp_exit - lp_full)).sum(-1).mean()
    assert mean.item() == pytest.approx(expected.item(), rel=1e-4)


def test_calibrate_picks_first_layer_under_threshold():
    model = tiny_model("llava", num_layers=6).eval()
    samples = singles(model, [dict(seed=s) for s in range(4)])
    batches = [collate(samples[:2]), collate(samples[2:])]
    record = calibrate(model, batches, CalibrationConfig(threshold=0.02, num_samples=4))
    curve = record.kl_curve
    assert sorted(curve) == list(range(7)) and curve[6] == 0.0
    assert record.exit_layer == min(k for k, v in curve.items() if v <= 0.02)
    assert record.num_samples == 4
    # a threshold nothing below L meets falls back to the full model
    strict = calibrate(model, batches, CalibrationConfig(threshold=0.0, num_samples=4))
    assert strict.exit_layer == 6
    lenient = calibrate(model, batches, CalibrationConfig(threshold=10.0, num_samples=4, min_layer=2))
    assert lenient.exit_layer == 2
    # averaging is over samples: calibrating on each half and averaging gives the same curve
    halves = [calibrate(model, [b], CalibrationConfig(num_samples=2)).kl_curve for b in batches]
    for k in curve:
        assert curve[k] == pytest.approx((halves[0][k] + halves[1][k]) / 2, rel=1e-5, abs=1e-8)


def test_record_roundtrip_and_checks(tmp_path):
    model = tiny_model("llava", num_layers=4).eval()
    batch = collate(singles(model, [dict(), dict(seed=3)]))
    record = calibrate(model, [batch], CalibrationConfig(num_samples=2))
    path = record.save(tmp_path / "vtw_calibration.json")
    loaded = CalibrationRecord.load(path, model=model)
    assert loaded == record
    other = tiny_model("llava", num_layers=4, seed=1).eval()
    with pytest.raises(ValueError, match="different base model"):
        CalibrationRecord.load(path, model=other)
    deeper = tiny_model("llava", num_layers=5).eval()
    with pytest.raises(ValueError, match="4-layer decoder"):
        CalibrationRecord.load(path, model=deeper)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CalibrationRecord.load(path)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a vtw-train calibration record"):
        CalibrationRecord.load(path)
    with pytest.raises(FileNotFoundError, match="calibrate.py"):
        CalibrationRecord.load(tmp_path / "missing.json")


def test_config_validation():
    with pytest.raises(ValueError, match="threshold"):
        CalibrationConfig(threshold=-1)
    with pytest.raises(ValueError, match="metric"):
        CalibrationConfig(metric="last")
    model = tiny_model("llava", num_layers=4).eval()
    with pytest.raises(ValueError, match="min_layer"):
        calibrate(model, [], CalibrationConfig(min_layer=9))
    with pytest.raises(ValueError, match="no samples"):
        calibrate(model, [], CalibrationConfig())


def test_calibrate_script_writes_record(tmp_path, capsys):
    from vtw_train.cli.calibrate import main

    out = tmp_path / "cal.json"
    record = main(
        [
            "--config",
            "configs/calibrate/random_llava.yaml",
            "--calibration.num_samples",
            "4",
            "--benchmark_repeats",
            "1",
            "--output",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert f"calibrated exit layer K = {record.exit_layer}" in printed
    assert "one plain forward" in printed
    assert json.loads(out.read_text())["exit_layer"] == record.exit_layer


@pytest.mark.parametrize("metric", ["first_token", "answer_mean"])
def test_calibrate_script_on_llava_format_data(tmp_path, metric):
    from miniature import build_miniature

    from vtw_train.cli.calibrate import main

    paths = build_miniature(tmp_path / "mini", text_layers=3, train=4, val=4)
    out = tmp_path / "cal.json"
    record = main(
        [
            "--model.tiny_family",
            "null",
            "--model.path",
            str(paths["model"]),
            "--data.source",
            "llava_json",
            "--data.path",
            str(paths["train"]),
            "--data.batch_size",
            "2",
            "--calibration.num_samples",
            "4",
            "--calibration.metric",
            metric,
            "--benchmark_repeats",
            "1",
            "--output",
            str(out),
        ]
    )
    assert record.num_samples == 4 and record.metric == metric and record.num_layers == 3
    assert CalibrationRecord.load(out).kl_curve == record.kl_curve


def test_vtw_settings_come_from_its_table_with_a_fallback():
    from vtw_train.calibration import VTW_FALLBACK, vtw_setting

    def llava(layers: int, hidden: int, model_type: str = "llava"):
        class Config:
            def get_text_config(self, decoder=True):
                return types.SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden)

        config = Config()
        config.model_type = model_type
        return types.SimpleNamespace(config=config)

    assert vtw_setting(llava(32, 4096)).threshold == 0.003 and vtw_setting(llava(32, 4096)).min_layer == 5
    assert vtw_setting(llava(40, 5120)).threshold == 0.0005
    assert vtw_setting(llava(32, 4096, "llava_next")).threshold == 0.0001
    assert vtw_setting(llava(28, 3584, "qwen2_vl")) == VTW_FALLBACK
    assert VTW_FALLBACK.threshold == 0.003 and VTW_FALLBACK.min_layer == 0


def test_calibrate_uses_vtw_s_eta_unless_one_is_set():
    model = tiny_model("llava", num_layers=5).eval()
    batch = collate(singles(model, [dict(), dict(seed=11)]), "left")
    record = calibrate(model, [batch], CalibrationConfig(num_samples=batch["input_ids"].shape[0]))
    assert record.threshold == 0.003 and record.threshold_source == "VTW's eta for unlisted models"
    assert record.metric == "first_token" and min(record.kl_curve) == 0
    chosen = calibrate(
        model, [batch], CalibrationConfig(num_samples=batch["input_ids"].shape[0], threshold=0.5)
    )
    assert chosen.threshold == 0.5 and chosen.threshold_source == "set by the user"
