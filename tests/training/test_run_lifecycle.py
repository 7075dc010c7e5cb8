"""The main job's life cycle: interrupted and resumed runs, the output folder, what the parser refuses.

A resumed run must be the run it continues: the same batches in the same order and the same
trainable tensors at the end as an uninterrupted run. An interrupt (SIGTERM, or Ctrl-C) stops at a
step boundary with a checkpoint and prints the command that resumes it. Remote checkpoints are
refused before anything is unpickled.
"""

from __future__ import annotations

import http.server
import os
import pickle
import signal
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from miniature import build_miniature
from safetensors.torch import load_file

import vtw_train.cli.train as train_cli
from vtw_train.training.interrupt import SaveOnInterrupt
from vtw_train.training.module import GateDistillModule

STEPS = 6


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    # 40 training samples in batches of 4: 10 batches per epoch, so a 6-step run is mid-epoch at step 3.
    return build_miniature(tmp_path_factory.mktemp("life"), text_layers=4, train=40, val=8)


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def write_config(paths, tmp_path: Path, out: str, **run) -> Path:
    config = {
        "model": {"model_path": str(paths["model"]), "lora_r": 4, "gate_width": 16, "warmup_steps": 1},
        "data": {"train_path": str(paths["train"]), "val_path": str(paths["val"]), "batch_size": 4},
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": STEPS,
            "logger": False,
            "enable_checkpointing": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
        },
        "run": {
            "output_dir": str(tmp_path / out),
            "calibration_samples": 4,
            "eval_samples": 0,
            "wandb": False,
            **run,
        },
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def seen(monkeypatch):
    """The input ids of every training batch, in order, across the runs of one test."""
    batches: list[list[list[int]]] = []
    original = GateDistillModule.training_step

    def recording(self, batch, batch_idx):
        batches.append(batch["input_ids"].tolist())
        return original(self, batch, batch_idx)

    monkeypatch.setattr(GateDistillModule, "training_step", recording)
    return batches


def interrupt_at(monkeypatch, step: int, signum: int) -> None:
    """Send ``signum`` to this process after training step ``step``, as a user or a scheduler would."""

    class InterruptedAt(SaveOnInterrupt):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == step:
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(train_cli, "SaveOnInterrupt", InterruptedAt)


def trained_tensors(out: Path) -> dict[str, torch.Tensor]:
    gated = out / "gated"
    return {**load_file(gated / "adapter_model.safetensors"), **load_file(gated / "exit_gate.safetensors")}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(
    paths, tmp_path, monkeypatch, seen, capsys, signum
):
    whole = train_cli.main(["--config", str(write_config(paths, tmp_path, "whole"))])
    uninterrupted = list(seen)
    assert len(uninterrupted) == STEPS
    seen.clear()

    config = write_config(paths, tmp_path, "split")
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3, signum)
        with pytest.raises(SystemExit) as stop:
            train_cli.main(["--config", str(config)])
    assert stop.value.code == 130
    checkpoint = tmp_path / "split" / "checkpoints" / "interrupted.ckpt"
    assert checkpoint.is_file()
    printed = capsys.readouterr().out
    assert "interrupted at step 3; resume with:" in printed and f"--run.resume {checkpoint}" in printed
    assert len(seen) == 3
    started = yaml.safe_load((tmp_path / "split" / "run.json").read_text())["run_id"]

    resumed = train_cli.main(["--config", str(config), "--run.resume", str(checkpoint)])
    assert seen == uninterrupted, "the resumed run must continue the data stream, not restart it"
    assert resumed["run_id"] == started != whole["run_id"], "a resumed run continues the same run"
    a, b = trained_tensors(tmp_path / "whole"), trained_tensors(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class _Payload:
    """Unpickling this writes a file: proof that a checkpoint's code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_served_checkpoint_is_refused_and_never_unpickled(paths, tmp_path):
    marker = tmp_path / "payload-ran"
    served = tmp_path / "served"
    served.mkdir()
    with (served / "evil.ckpt").open("wb") as handle:
        pickle.dump({"state_dict": _Payload(str(marker))}, handle)

    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/evil.ckpt"
        config = write_config(paths, tmp_path, "remote")
        with pytest.raises(ValueError, match="is a URL.*download it"):
            train_cli.main(["--config", str(config), "--run.resume", url])
    finally:
        server.shutdown()
    assert not marker.exists(), "the served checkpoint's payload ran"
    assert not (tmp_path / "remote").exists(), "a refused run leaves no output folder"

    # A local pickle with a payload is refused by weights_only loading, and nothing runs either.
    local = served / "evil.ckpt"
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|Unsupported global"):
        train_cli.main(["--config", str(config), "--run.resume", str(local)])
    assert not marker.exists()


def test_a_used_output_folder_is_refused_unless_resumed_or_overwritten(paths, tmp_path, capsys):
    config = write_config(paths, tmp_path, "used", eval_samples=2, eval_batch_size=2)
    train_cli.main(["--config", str(config)])
    err = capsys.readouterr().err
    assert "evaluation" in err and "sample/s" in err, "the evaluation shows its progress"
    out = tmp_path / "used"
    before = sorted(p.name for p in out.iterdir())
    assert {"evaluation.json", "gated", "vtw_calibration.json", "run.json"} <= set(before)
    with pytest.raises(ValueError, match="is not empty.*--run.resume.*--run.overwrite true"):
        train_cli.main(["--config", str(config)])
    assert sorted(p.name for p in out.iterdir()) == before, "a refused run changes nothing"

    # An overwriting run clears the old outputs before writing anything: killed after calibrating with
    # another eta, the folder holds the new record and no stale evaluation or checkpoint beside it.
    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(L.Trainer, "fit", killed)
        with pytest.raises(Killed):
            train_cli.main(
                ["--config", str(config), "--run.overwrite", "true", "--run.calibration_threshold", "1e9"]
            )
    assert not (out / "evaluation.json").exists() and not (out / "gated").exists()
    assert yaml.safe_load((out / "vtw_calibration.json").read_text())["threshold"] == 1e9


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["--model.gate_tau", "1.5"], "model.gate_tau"),
        (["--model.lora_r", "-3"], "model.lora_r"),
        (["--model.temperature", "0"], "model.temperature"),
        (["--run.eval_taus", "[0.5, 2.0]"], "run.eval_taus"),
        (["--data.batch_size", "0"], "data.batch_size"),
        (["--run.calibration_samples", "0"], "run.calibration_samples"),
    ],
)
def test_out_of_range_values_are_refused_by_the_parser_naming_the_key(paths, tmp_path, capsys, override, key):
    config = write_config(paths, tmp_path, "ranges")
    with pytest.raises(SystemExit):
        train_cli.main(["--config", str(config), *override])
    assert key in capsys.readouterr().err
    assert not (tmp_path / "ranges").exists()


def test_a_gate_min_layer_the_model_cannot_use_leaves_no_folder(paths, tmp_path):
    config = write_config(paths, tmp_path, "minlayer")
    with pytest.raises(
        ValueError, match=r"model.gate_min_layer=3 .* model.gate_lag is 1, so it must be at most 1"
    ):
        train_cli.main(["--config", str(config), "--model.gate_min_layer", "3"])
    assert not (tmp_path / "minlayer").exists()


def test_modules_built_in_python_check_the_same_ranges(paths):
    with pytest.raises(ValueError, match=r"model.gate_tau must be in \(0, 1\]"):
        GateDistillModule(model_path=str(paths["model"]), gate_tau=1.5)


def test_the_progress_bar_counts_steps_not_negative_epochs():
    from lightning.pytorch.callbacks import RichProgressBar

    from vtw_train.training.progress import label_steps

    trainer = L.Trainer(
        max_steps=400, logger=False, enable_checkpointing=False, callbacks=[RichProgressBar()]
    )
    label_steps(trainer)
    bar = trainer.progress_bar_callback
    bar.setup(trainer, None, "fit")  # what Lightning does when fit starts
    description = bar._get_train_description(0)
    assert description == "training from step 0 of 400"
    assert "-2" not in description
