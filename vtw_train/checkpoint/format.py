"""The gated checkpoint's on-disk format: file names, the manifest, and checking a directory.

Why a directory of small files and no model weights (docs/methods.md §14.3): the base model is
tens of gigabytes and already on disk or on a hub, while what training produced is a few
megabytes. The directory is peft's own adapter format plus vtw files that peft ignores, so a
plain ``PeftModel.from_pretrained`` still loads the adapter. The manifest records what the
adapter and the gate were trained on and the sha256 of every file, so a loader can refuse a
wrong base or a corrupt file by name before it deserialises anything.

Layout::

    adapter_config.json        peft (base_model_name_or_path recorded)
    adapter_model.safetensors  peft: LoRA tensors only
    exit_gate.safetensors      gate state dict        (when a gate was trained)
    exit_gate_config.json      GateConfig             (when a gate was trained)
    vtw_calibration.json       CalibrationRecord      (when calibrated)
    vtw_config.json            manifest: versions, base fingerprint, sizes, policy, file sha256s
    README.md                  model card

Nothing here calls ``torch.load``: weights are safetensors, everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..adapters import base_model_of

if TYPE_CHECKING:
    from ..engine import ExitController
    from ..gate import GateConfig

FORMAT = "vtw-gated/1"
MANIFEST = "vtw_config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GATE_WEIGHTS = "exit_gate.safetensors"
GATE_CONFIG = "exit_gate_config.json"
CALIBRATION = "vtw_calibration.json"
MODEL_CARD = "README.md"
#: Files that must never sit at the top: they would make the directory look like a full model.
FORBIDDEN_AT_TOP = ("config.json", "model.safetensors")
#: Not hashed: the manifest cannot contain its own hash, and the card is for people to edit.
UNHASHED = (MANIFEST, MODEL_CARD)
ADAPTER_NAME = "default"


def hidden_size(model: nn.Module) -> int:
    """The text decoder's width, which the gate was built for."""
    return int(base_model_of(model).config.get_text_config(decoder=True).hidden_size)


def image_token_id(config: Any) -> int | None:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def dtype_name(model: nn.Module) -> str:
    return str(next(base_model_of(model).parameters()).dtype).removeprefix("torch.")


def check_gate_sizes(config: GateConfig, controller: ExitController, hidden: int, what: str) -> None:
    if config.num_layers != controller.num_layers or config.hidden_size != hidden:
        raise ValueError(
            f"{what} was built for a {config.num_layers}-layer decoder of width {config.hidden_size}; "
            f"the model has {controller.num_layers} layers of width {hidden}."
        )


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hashed_files(directory: Path) -> list[str]:
    names = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()]
    return sorted(n for n in names if n not in UNHASHED)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def check_layout(directory: Path) -> None:
    bad = [name for name in FORBIDDEN_AT_TOP if (directory / name).exists()]
    if bad:
        raise RuntimeError(
            f"refusing to write {bad} at the top of a gated checkpoint: it holds no base-model weights "
            "(docs/methods.md §14.3)."
        )


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``vtw_config.json``, with its format checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Gated checkpoint {directory} does not exist or is not a directory.")
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {directory} is not a vtw gated checkpoint. Write one with "
            "vtw_train.checkpoint.export_gated_checkpoint (a bare peft adapter loads with PeftModel.from_pretrained)."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-export the checkpoint.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(
            f"{path}: format {found!r} is not {FORMAT!r}; this vtw-train reads {FORMAT} checkpoints only. "
            "Re-export it with this version."
        )
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}; re-export the checkpoint.")
    return manifest


_REQUIRED_KEYS = (
    "base_model",
    "base_model_fingerprint",
    "base_model_dtype",
    "model_class",
    "num_layers",
    "fallback_exit_layer",
    "policy",
    "files",
)


def verify_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Check the manifest and every listed file's sha256; return the manifest.

    Reads only bytes, loads no tensors: a corrupt or truncated download is reported by file
    name before anything is deserialised.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    files: dict[str, str] = manifest["files"]
    required = [ADAPTER_CONFIG, ADAPTER_WEIGHTS] + (
        [GATE_CONFIG, GATE_WEIGHTS] if manifest.get("has_gate") else []
    )
    for name in required:
        if name not in files:
            raise ValueError(f"{directory / MANIFEST} does not list {name}; re-export the checkpoint.")
    for name, expected in sorted(files.items()):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(
                f"{directory / MANIFEST} lists {name!r}, which is outside the checkpoint; re-export."
            )
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing from the gated checkpoint (listed in {MANIFEST}); copy the whole "
                "directory again or re-export it."
            )
        found = sha256_of(path)
        if found != expected:
            raise ValueError(
                f"{path} is corrupt or was modified: sha256 {found[:16]}... but {MANIFEST} records "
                f"{expected[:16]}.... Copy the file again or re-export the checkpoint."
            )
    for name in FORBIDDEN_AT_TOP:
        if (directory / name).exists():
            raise ValueError(
                f"{directory / name} should not be in a gated checkpoint (it holds no base weights); remove it."
            )
    return manifest
