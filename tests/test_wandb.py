"""W&B mode resolution (METHODS.md §14.2): WANDB_MODE wins, then an API key, else offline with a sync hint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vtw_train.lit.wandb import resolve_wandb_mode


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
        "from vtw_train.lit.wandb import make_wandb_logger\n"
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
