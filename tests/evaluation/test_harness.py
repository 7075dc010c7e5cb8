"""The evaluation harness (``scripts/evaluate.py``): outputs, invariants of the numbers, config errors.

Everything runs on the miniature toy model (``tests/miniature.py``): random weights, so accuracy
itself means nothing, but every invariant below (full = reference, K = L = full, FLOPs order,
files agreeing with each other) must hold for any weights.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from miniature import build_miniature

from vtw_train.cli.evaluate import EvalData, EvaluateRun, load_records, main
from vtw_train.config import parse_config
from vtw_train.data.synthetic import generate_dataset
from vtw_train.evaluation import (
    FastVSetting,
    StrategySweep,
    budget_sentence,
    budget_verdict,
    expand_strategies,
)
from vtw_train.evaluation.results import HarnessResult, StrategyResult
from vtw_train.gate import ExitGate, GateConfig

LAYERS = 4
LM_TARGETS = r".*language_model\.layers\.\d+\.self_attn\.(q|v)_proj"


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    paths = build_miniature(root, text_layers=LAYERS, train=4, val=4)
    data = root / "eval"
    paths["eval"] = generate_dataset(data, 12, seed=303, filename="eval.jsonl")
    paths["calibration"] = generate_dataset(data, 4, seed=404, filename="calibration.jsonl")
    paths["root"] = root
    return paths


def _config(miniature, out_dir: Path, **overrides) -> dict:
    config = {
        "model": {"path": str(miniature["model"])},
        "data": {"path": str(miniature["eval"]), "calibration_path": str(miniature["calibration"])},
        "strategies": {
            "vtw": [1, 2, LAYERS],
            "vtw_calibrated": True,
            "vtw_answer_calibrated": True,
            "vispruner": [16],
            "random_tokens": [16],
            "shortv": [1],
            "fastv": [{"layer": 1, "keep_ratio": 0.5}],
            "vispruner_vtw": [{"tokens": 16, "exit_layer": 2}],
            "shortv_vtw": [{"frozen": 2, "exit_layer": 2}],
            "fastv_vtw": [{"layer": 1, "keep_ratio": 0.5, "exit_layer": 2}],
        },
        "calibration": {"num_samples": 4, "shortv_samples": 4, "batch_size": 2, "threshold": 0.01},
        "generation": {"batch_size": 5, "max_new_tokens": 2},
        "timing": {"batch_size": 4, "repeats": 1, "warmup": 0},
        "device": "cpu",
        "threads": 1,
        "output_dir": str(out_dir),
    }
    for key, value in overrides.items():  # a strategies override replaces the sweep; other sections merge
        merge = isinstance(value, dict) and key != "strategies"
        config[key] = {**config[key], **value} if merge else value
    return config


def _run(miniature, out_dir: Path, **overrides):
    path = out_dir.parent / f"{out_dir.name}.yaml"
    path.write_text(yaml.safe_dump(_config(miniature, out_dir, **overrides)))
    threads = torch.get_num_threads()
    try:
        return main(["--config", str(path)])
    finally:
        torch.set_num_threads(threads)  # main() applies the config's `threads`; keep other tests unaffected


@pytest.fixture(scope="module")
def run(miniature):
    out = miniature["root"] / "out"
    result = _run(miniature, out)
    return {"result": result, "out": out}


def test_run_writes_every_output(run, capsys):
    out = run["out"]
    for name in ("results.json", "results.csv", "predictions.jsonl", "summary.md", "accuracy_vs_flops.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "vtw_calibration.json").is_file() and (out / "shortv_record.json").is_file()
    names = [s.name for s in run["result"].strategies]
    assert names[0] == "full"
    assert "VisPruner T=16 + VTW K=2" in names and "ShortV N=2 + VTW K=2" in names
    assert any(n.startswith("VTW calibrated K=") for n in names)
    assert any(n.startswith("VTW answer-KL K=") for n in names), "both calibration rules, side by side"
    assert len(names) == len(set(names))
    assert run["result"].calibration["metric"] == "first_token"
    assert run["result"].meta["answer_calibration"]["metric"] == "answer_mean"
    summary = (out / "summary.md").read_text()
    assert "VTW calibrated: K =" in summary and "VTW answer-KL: K =" in summary
    assert "each sample at its own prompt length (here" in summary
    pruned = run["result"].by_name("VisPruner T=16")
    assert pruned.mean_visual_in is not None and pruned.mean_visual_in <= 16
    control = run["result"].by_name("random T=16 (control)")
    assert control.mean_visual_in == pruned.mean_visual_in and control.flops_ratio == pruned.flops_ratio


def test_full_model_is_the_reference(run):
    full = run["result"].full
    assert full.flops_ratio == pytest.approx(1.0)
    assert full.agreement == 1.0
    assert full.time_ratio == pytest.approx(1.0) and full.kv_ratio == pytest.approx(1.0)
    assert all(g.flops_ratio == pytest.approx(1.0) and g.agreement == 1.0 for g in full.per_type.values())


def test_vtw_at_the_last_layer_is_the_full_model(run):
    result = run["result"]
    full, last = result.full, result.by_name(f"VTW K={LAYERS}")
    assert last.predictions == full.predictions
    assert last.accuracy == full.accuracy and last.agreement == 1.0
    assert last.flops_ratio == pytest.approx(1.0)


def test_flops_fall_strictly_with_earlier_exits(run):
    result = run["result"]
    ratios = [result.by_name(f"VTW K={k}").flops_ratio for k in (1, 2, LAYERS)]
    assert ratios[0] < ratios[1] < ratios[2]
    # Compositions cost less than either part alone.
    both = result.by_name("VisPruner T=16 + VTW K=2").flops_ratio
    assert (
        both < result.by_name("VisPruner T=16").flops_ratio and both < result.by_name("VTW K=2").flops_ratio
    )
    assert result.by_name("ShortV N=1").flops_ratio < 1.0
    assert result.by_name("FastV K=1 keep=0.5").flops_ratio < 1.0
    fastv_exit = result.by_name("FastV K=1 keep=0.5 + VTW K=2")
    assert fastv_exit.flops_ratio < result.by_name("FastV K=1 keep=0.5").flops_ratio
    assert fastv_exit.flops_ratio < result.by_name("VTW K=2").flops_ratio
    assert fastv_exit.mean_exit_layer == 2
    # Withdrawal shrinks the measured KV cache of the timing batch.
    assert result.by_name("VTW K=1").kv_bytes < result.full.kv_bytes


def test_per_type_numbers_average_back_to_overall(run):
    for s in run["result"].strategies:
        n = sum(g.n for g in s.per_type.values())
        assert n == s.n == run["result"].num_samples
        for attr in ("accuracy", "agreement", "flops_ratio"):
            weighted = sum(getattr(g, attr) * g.n for g in s.per_type.values()) / n
            assert weighted == pytest.approx(getattr(s, attr)), (s.name, attr)


def test_csv_and_json_agree(run):
    data = json.loads((run["out"] / "results.json").read_text())
    with (run["out"] / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    by_key = {(r["strategy"], r["question_type"]): r for r in rows}
    assert len(data["strategies"]) == len(run["result"].strategies)
    for s in data["strategies"]:
        row = by_key[(s["name"], "overall")]
        assert row["method"] == s["method"] and int(row["n"]) == s["n"]
        for key in ("accuracy", "agreement", "flops_ratio", "time_ratio", "kv_ratio"):
            assert float(row[key]) == pytest.approx(s[key]), (s["name"], key)
        assert int(row["kv_bytes"]) == s["kv_bytes"]
        assert json.loads(row["settings"]) == s["settings"]
        for qtype, g in s["per_type"].items():
            typed = by_key[(s["name"], qtype)]
            assert int(typed["n"]) == g["n"]
            for key in ("accuracy", "agreement", "flops_ratio"):
                assert float(typed[key]) == pytest.approx(g[key])
    assert len(rows) == sum(1 + len(s["per_type"]) for s in data["strategies"])
    assert "verdict" in data["budget"] and data["calibration"]["exit_layer"] is not None


def test_png_is_a_readable_image(run):
    import matplotlib.image

    image = matplotlib.image.imread(run["out"] / "accuracy_vs_flops.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert float(image[..., :3].std()) > 0.01  # not a blank canvas


def test_markdown_has_a_row_per_strategy_and_the_verdict(run, capsys):
    text = (run["out"] / "summary.md").read_text()
    assert "| strategy | method | accuracy |" in text
    for s in run["result"].strategies:
        assert f"| {s.name} | {s.method} |" in text, s.name
    assert "## Per question type: accuracy" in text
    for qtype in run["result"].question_types:
        assert f"{qtype} (n=" in text
    assert "of the full model's LM FLOPs" in text


def test_predictions_file_lists_every_strategy(run):
    lines = (run["out"] / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == run["result"].num_samples
    first = json.loads(lines[0])
    assert set(first["predictions"]) == {s.name for s in run["result"].strategies}


def test_final_line_answers_the_budget_question(miniature, tmp_path, capsys):
    _run(
        miniature,
        tmp_path / "budget",
        strategies={"vtw": [1], "vtw_calibrated": False, "shortv": []},
        budget=0.5,
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("at <= 50% of the full model's LM FLOPs, the best method is VTW K=1")
    assert "of the full model's accuracy" in last and "by family: VTW:" in last


def test_gated_checkpoint_gate_on_adapters_off_elsewhere(miniature, tmp_path, run):
    from peft import LoraConfig, get_peft_model

    from vtw_train import attach
    from vtw_train.checkpoint import export_gated_checkpoint
    from vtw_train.models import ModelSpec, load_model

    base, _ = load_model(ModelSpec(path=str(miniature["model"])))
    for param in base.parameters():
        param.requires_grad_(False)
    model = get_peft_model(base, LoraConfig(target_modules=LM_TARGETS, r=4, init_lora_weights=False)).eval()
    attach(model)
    hidden = base.config.text_config.hidden_size
    gate = ExitGate(GateConfig(hidden_size=hidden, num_layers=LAYERS, width=8, min_layer=0, tau=0.5))
    gated = export_gated_checkpoint(
        tmp_path / "gated", model, gate, None, base_model_name_or_path=str(miniature["model"])
    )
    result = _run(
        miniature,
        tmp_path / "gated_out",
        gated_checkpoint=str(gated),
        strategies={
            "vtw": [2],
            "vtw_calibrated": True,
            "lora_vtw": [2],
            "shortv": [1],
            "gate": [0.5, 1.0],
            "vispruner_gate": [{"tokens": 16, "tau": 0.5}],
            "fastv_gate": [{"layer": 1, "keep_ratio": 0.5, "tau": 0.5}],
        },
    )
    base_run = run["result"]
    names = [s.name for s in result.strategies]
    calibrated = f"VTW calibrated K={base_run.calibration['exit_layer']}"
    assert names == [
        "full",
        "VTW K=2",
        calibrated,
        "LoRA + VTW K=2",
        "gate tau=0.5",
        "gate tau=1",
        "ShortV N=1",
        "VisPruner T=16 + gate tau=0.5",
        "FastV K=1 keep=0.5 + gate tau=0.5",
    ]
    # Calibration, Layer Contribution and every non-gate strategy run on the base model (adapters off):
    # the same K, the same freezing order and the same answers as the run without a checkpoint.
    assert result.calibration == base_run.calibration
    assert result.shortv["frozen_order"] == base_run.shortv["frozen_order"]
    for name in ("full", "VTW K=2", calibrated, "ShortV N=1"):
        assert result.by_name(name).predictions == base_run.by_name(name).predictions, name
    for s in result.strategies:
        if "gate" in s.name:
            assert s.mean_exit_layer is not None and 0 < s.flops_ratio <= 1.0
    # LoRA at a fixed K: the adapters change the answers, not the FLOPs.
    lora, plain = result.by_name("LoRA + VTW K=2"), result.by_name("VTW K=2")
    assert lora.flops_ratio == plain.flops_ratio and lora.mean_exit_layer == plain.mean_exit_layer
    assert lora.predictions != plain.predictions
    # tau = 1 can only fire on p_exit == 1: the gate keeps (almost) everything.
    assert result.by_name("gate tau=1").flops_ratio >= result.by_name("gate tau=0.5").flops_ratio


def test_wrong_config_key_fails_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategies:\n  vtww: [1, 2]\n")
    with pytest.raises(SystemExit):
        parse_config(EvaluateRun, ["--config", str(bad)], "evaluate.py", "")
    assert "vtww" in capsys.readouterr().err
    nested = tmp_path / "nested.yaml"
    nested.write_text("strategies:\n  fastv:\n    - {layer: 1, keep_rato: 0.5}\n")
    with pytest.raises(SystemExit):
        parse_config(EvaluateRun, ["--config", str(nested)], "evaluate.py", "")
    assert "keep_rato" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("sweep", "kwargs", "key"),
    [
        (StrategySweep(vtw=[9], vtw_calibrated=False), {}, "strategies.vtw[0]"),
        (
            StrategySweep(vtw_calibrated=False, fastv=[FastVSetting(layer=LAYERS)]),
            {},
            "strategies.fastv[0].layer",
        ),
        (StrategySweep(vtw_calibrated=False, vispruner=[0]), {}, "strategies.vispruner[0]"),
        (StrategySweep(vtw_calibrated=False, gate=[0.5]), {}, "gated_checkpoint"),
        (StrategySweep(vtw_calibrated=False, lora_vtw=[2]), {}, "strategies.lora_vtw"),
        (
            StrategySweep(vtw_calibrated=False, gate=[1.5]),
            {"gate": ExitGate(GateConfig(hidden_size=8, num_layers=LAYERS))},
            "strategies.gate[0]",
        ),
        (StrategySweep(vtw=[2, 2], vtw_calibrated=False), {}, "listed twice"),
    ],
)
def test_bad_strategy_values_name_the_key(sweep, kwargs, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        expand_strategies(sweep, LAYERS, **kwargs)


def test_calibration_records_never_overlap_evaluated_ones(miniature):
    data = EvalData(path=str(miniature["eval"]), num_samples=8)
    evaluated, calibration = load_records(data, 4)
    assert len(evaluated) == 8 and len(calibration) == 4
    assert not {r.id for r in evaluated} & {r.id for r in calibration}
    copy = miniature["eval"].parent / "copy_of_eval.jsonl"
    copy.write_text(miniature["eval"].read_text())
    with pytest.raises(ValueError, match="data.calibration_path shares"):
        load_records(replace(data, calibration_path=str(copy)), 4)


def test_too_few_calibration_records_say_why_and_what_to_change(miniature):
    everything = EvalData(path=str(miniature["eval"]), num_samples=0, calibration_path=str(miniature["eval"]))
    with pytest.raises(
        ValueError, match=r"data.calibration_path is data.path.*num_samples = 0 evaluates all of them"
    ):
        load_records(everything, 4)
    small = EvalData(
        path=str(miniature["eval"]), num_samples=8, calibration_path=str(miniature["calibration"])
    )
    with pytest.raises(ValueError, match=r"holds 4 records, but calibration needs 9"):
        load_records(small, 9)


def test_unreadable_records_can_be_skipped(miniature, tmp_path):
    broken = tmp_path / "broken.jsonl"
    lines = miniature["eval"].read_text().splitlines()
    broken.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    for line in (miniature["eval"].parent / "images").iterdir():
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / line.name).write_bytes(line.read_bytes())
    with pytest.raises(Exception, match="broken.jsonl"):
        load_records(EvalData(path=str(broken), num_samples=4), 0)
    evaluated, _ = load_records(EvalData(path=str(broken), num_samples=4, on_error="skip"), 0)
    assert len(evaluated) == 4


def _result(points: list[tuple[str, str, float, float]]) -> HarnessResult:
    strategies = [
        StrategyResult(name, method, {}, 10, acc, 1.0, flops, math.nan, math.nan, 0, math.nan, None, None)
        for name, method, acc, flops in points
    ]
    return HarnessResult(
        strategies, num_layers=LAYERS, num_samples=10, question_types={}, timing_batch_size=1
    )


def test_budget_verdict_picks_the_most_accurate_within_budget():
    result = _result(
        [
            ("full", "full", 0.80, 1.0),
            ("VTW K=1", "VTW", 0.40, 0.30),
            ("VTW K=2", "VTW", 0.70, 0.50),
            ("VisPruner T=8", "VisPruner", 0.72, 0.20),
            ("ShortV N=1", "ShortV", 0.80, 0.80),
        ]
    )
    verdict = budget_verdict(result, 0.5)
    assert verdict.best.name == "VisPruner T=8"
    assert verdict.per_family["VTW"].name == "VTW K=2" and verdict.per_family["ShortV"] is None
    line = budget_sentence(verdict)
    assert line.startswith("at <= 50% of the full model's LM FLOPs, the best method is VisPruner T=8")
    assert "90.0% of the full model's accuracy" in line
    assert "ShortV: none within budget (cheapest ShortV N=1 at 0.80x, 100.0%)" in line


def test_runner_is_usable_without_the_cli(miniature):
    """run_harness on in-memory records with a plain model and a gate that is not in a checkpoint."""
    from vtw_train.data import LlavaJsonDataset
    from vtw_train.evaluation import GenerationSettings, TimingSettings, run_harness
    from vtw_train.models import ModelSpec, load_model

    model, processor = load_model(ModelSpec(path=str(miniature["model"])))
    records = LlavaJsonDataset(miniature["eval"]).records[:4]
    torch.manual_seed(0)
    gate = ExitGate(GateConfig(hidden_size=model.config.text_config.hidden_size, num_layers=LAYERS, width=8))
    result = run_harness(
        model,
        processor,
        records,
        [],
        StrategySweep(vtw=[0], vtw_calibrated=False, gate=[0.5]),
        generation=GenerationSettings(batch_size=4, max_new_tokens=2),
        timing=TimingSettings(batch_size=2, repeats=0),
        gate=gate,
        log=lambda _: None,
    )
    assert [s.name for s in result.strategies] == ["full", "VTW K=0", "gate tau=0.5"]
    assert all(math.isnan(s.time_ratio) for s in result.strategies)  # timing skipped
    assert result.by_name("VTW K=0").kv_bytes < result.full.kv_bytes
