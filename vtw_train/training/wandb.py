"""Weights & Biases without surprises (docs/methods.md §14.2).

The mode is resolved once: ``WANDB_MODE`` wins; otherwise online only when an API key is
available (``WANDB_API_KEY`` or a netrc entry for api.wandb.ai); otherwise offline, with one
line saying how to upload later. ``wandb`` itself is imported lazily.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info


def _has_netrc_key() -> bool:
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators("api.wandb.ai") is not None
    except (netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode() -> str:
    """``online``, ``offline`` or ``disabled``."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if os.environ.get("WANDB_API_KEY") or _has_netrc_key():
        return "online"
    return "offline"


def make_wandb_logger(
    project: str, name: str | None, save_dir: str | os.PathLike, run_id: str | None = None
) -> Any | None:
    """A WandbLogger in the resolved mode, or None when W&B is disabled.

    ``run_id`` makes a resumed run continue the same W&B run (``resume="allow"``).
    """
    mode = resolve_wandb_mode()
    if mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    extra = {} if run_id is None else {"id": run_id, "resume": "allow"}
    logger = WandbLogger(
        project=project,
        name=name,
        save_dir=str(save_dir),
        offline=mode == "offline",
        log_model=False,
        **extra,
    )
    if mode == "offline":
        rank_zero_info(
            f"W&B: no API key found, logging offline to {save_dir}/wandb. Upload later with "
            f"`wandb sync {save_dir}/wandb/offline-run-*` (or set WANDB_API_KEY to log online)."
        )
    return logger
