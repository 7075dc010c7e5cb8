"""W&B mode resolution (docs/methods.md §14.2): WANDB_MODE wins, then an API key, else offline with a sync hint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vtw_train.training.wandb import resolve_wandb_mode


def test_env_wins(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_wandb_mode() == "offline"


def test_api_key_or_netrc_means_online(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode() == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_wandb_mode() == "online"


def test_offline_run_logs_locally_and_says_how_to_sync(tmp_path):
    """A fresh process with no key and no WANDB_MODE: offline files on disk, and the sync hint."""
    code = (
        "from vtw_train.training.wandb import make_wandb_logger\n"
        f"logger = make_wandb_logger('vtw-test', 'offline-check', {str(tmp_path)!r})\n"
        "logger.log_hyperparams({'lr': 0.1})\n"
        "logger.experiment.log({'loss': 1.0})\n"
        "logger.experiment.finish()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"), WANDB_SILENT="true")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no API key found, logging offline" in result.stdout + result.stderr  # our hint, not wandb's
    assert "wandb sync" in result.stdout + result.stderr
    assert list(Path(tmp_path, "wandb").glob("offline-run-*"))


def test_train_gate_logs_the_promised_panels_offline(tmp_path):
    """The main job in offline mode writes the config, losses, KL curve, exit histograms and tables."""
    import json

    from miniature import build_miniature

    paths = build_miniature(tmp_path / "mini", text_layers=3, train=8, val=8)
    cfg = {
        "model": {"model_path": str(paths["model"]), "lora_r": 2, "gate_width": 8, "gate_min_layer": 0},
        "data": {"train_path": str(paths["train"]), "val_path": str(paths["val"]), "batch_size": 4},
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "val_check_interval": 2,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "log_every_n_steps": 1,
        },
        "run": {
            "output_dir": str(tmp_path / "out"),
            "calibration_samples": 4,
            "eval_samples": 4,
            "eval_batch_size": 4,
            "export": False,
        },
    }
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"), WANDB_MODE="offline", WANDB_SILENT="true"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, str(root / "scripts" / "train_gate.py"), "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*/*.wandb"))
    assert runs, "no offline W&B run was written"
    content = runs[0].read_bytes()
    for key in (
        b"train/loss",
        b"calibration/kl_curve",
        b"val/gate_exit_layers",
        b"eval/policies",
        b"eval/gate_exit_layers",
        b"eval/sample_answers",
        b"lora_r",
    ):
        assert key in content, key
