"""Lightning training: checkpoints hold only trainable tensors, resume continues, DDP on CPU, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from miniature import build_miniature

from vtw_train.adapters import check_lora_placement
from vtw_train.data.datamodule import VLMDataModule
from vtw_train.engine import attach
from vtw_train.training.module import GateDistillModule

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_miniature(tmp_path_factory.mktemp("mini"), text_layers=4, train=16, val=8)


def make(paths, **overrides):
    module = GateDistillModule(
        model_path=str(paths["model"]), lora_r=4, gate_width=16, warmup_steps=1, **overrides
    )
    data = VLMDataModule(paths["train"], paths["val"], processor=str(paths["model"]), batch_size=4)
    return module, data


def trainer(tmp_path, max_steps, callbacks=()):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        callbacks=list(callbacks),
    )


class StartState(L.Callback):
    def on_train_start(self, trainer, module):
        self.step = trainer.global_step
        self.params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_lora_only_on_language_model(paths):
    module, _ = make(paths)
    module.configure_model()
    names = [n for n, _ in module.model.named_parameters() if "lora_" in n]
    assert names and all(".language_model.layers." in n for n in names)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in names)
    bad, _ = make(paths, lora_target=r".*(q_proj|v_proj)")  # would also wrap CLIP's attention
    with pytest.raises(ValueError, match="outside the language model"):
        bad.configure_model()
    check_lora_placement(module.model, attach(module.model).language_model)


def test_checkpoint_holds_only_trainable_tensors_and_resumes(paths, tmp_path):
    torch.manual_seed(0)
    module, data = make(paths)
    first = trainer(tmp_path, max_steps=2)
    first.fit(module, datamodule=data)
    ckpt = tmp_path / "step2.ckpt"
    first.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")
    trainable = module.trainable_state_keys()
    assert set(saved["state_dict"]) == trainable
    assert any(k.startswith("gate.") for k in trainable) and any("lora_" in k for k in trainable)
    assert saved["optimizer_states"] and saved["global_step"] == 2
    full_size = sum(p.numel() for p in module.parameters())
    assert sum(v.numel() for v in saved["state_dict"].values()) < full_size / 4

    resumed_module, data = make(paths)
    start = StartState()
    second = trainer(tmp_path, max_steps=4, callbacks=[start])
    second.fit(resumed_module, datamodule=data, ckpt_path=ckpt)
    assert start.step == 2 and second.global_step == 4
    for name, value in saved["state_dict"].items():
        torch.testing.assert_close(start.params[name], value, rtol=0, atol=0)


def test_checkpoint_with_missing_trainable_tensors_is_refused(paths, tmp_path):
    module, _ = make(paths)
    module.configure_model()
    state = {k: v for k, v in module.state_dict().items() if k.startswith("gate.")}
    with pytest.raises(ValueError, match="lacks"):
        module.on_load_checkpoint({"state_dict": state})


def write_config(paths, tmp_path, **trainer_overrides) -> Path:
    trainer_cfg = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "logger": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 1,
        **trainer_overrides,
    }
    cfg = {
        "model": {"model_path": str(paths["model"]), "lora_r": 4, "gate_width": 16},
        "data": {"train_path": str(paths["train"]), "val_path": str(paths["val"]), "batch_size": 4},
        "trainer": trainer_cfg,
        "run": {
            "output_dir": str(tmp_path / "out"),
            "calibration_samples": 4,
            "eval_samples": 4,
            "eval_batch_size": 4,
            "export": False,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))  # JSON is valid YAML
    return path


def run_cli(args, timeout=600):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_gate.py"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_runs_and_reports(paths, tmp_path):
    from vtw_train.cli.train import main

    summary = main(["--config", str(write_config(paths, tmp_path))])
    names = [r["name"] for r in summary["results"]]
    assert names[0] == "full model" and names[1].startswith("VTW fixed K=")
    assert names[2].startswith("LoRA + fixed K=") and names[3].startswith("gate")
    assert summary["results"][0]["flops_ratio"] == pytest.approx(1.0)
    assert (tmp_path / "out" / "vtw_calibration.json").is_file()
    assert json.loads((tmp_path / "out" / "evaluation.json").read_text())["results"]


def test_cli_rejects_typos_naming_the_key(paths, tmp_path):
    cfg = write_config(paths, tmp_path)
    result = run_cli(["--config", str(cfg), "--model.lora_rank", "4"], timeout=120)
    assert result.returncode != 0
    assert "lora_rank" in result.stderr


def test_ddp_on_cpu_with_two_processes(paths, tmp_path):
    cfg = write_config(paths, tmp_path, strategy="ddp", devices=2)
    result = run_cli(["--config", str(cfg), "--run.eval_samples", "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "calibrated K" in result.stdout


def test_tiny_config_fast_dev_run(tmp_path):
    """The shipped main-job config on the committed toy model, one batch of everything."""
    from vtw_train.cli.train import main

    data = tmp_path / "data"
    summary = main(
        [
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--trainer.fast_dev_run",
            "true",
            "--data.train_path",
            str(data / "train.jsonl"),
            "--data.val_path",
            str(data / "val.jsonl"),
            "--run.output_dir",
            str(tmp_path / "out"),
            "--run.synthetic.train_samples",
            "32",
            "--run.synthetic.val_samples",
            "16",
            "--run.calibration_samples",
            "8",
            "--run.eval_samples",
            "16",
        ]
    )
    assert 0 <= summary["calibrated_exit_layer"] <= 8
    assert [r["name"] for r in summary["results"]][:2] == [
        "full model",
        f"VTW fixed K={summary['calibrated_exit_layer']}",
    ]
    assert (tmp_path / "out" / "gated" / "vtw_config.json").is_file()


def test_model_policy_is_the_exported_default_policy(paths, tmp_path):
    """``model.policy`` is what the gated checkpoint loads with."""
    from vtw_train.checkpoint import read_manifest
    from vtw_train.cli.train import main

    config = write_config(paths, tmp_path)
    summary = main(["--config", str(config), "--model.policy", "gate_capped", "--run.export", "true"])
    assert read_manifest(summary["checkpoint"])["policy"] == "gate_capped"
