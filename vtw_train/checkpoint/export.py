"""Writing a gated checkpoint: LoRA adapter + exit gate + calibration + manifest + model card.

The directory is written into a temporary sibling and renamed into place, so a crash never
leaves a half-written checkpoint, and a trainer's mistakes (a LoRA on the vision tower, a gate
built for another depth) are refused here, while they can still be fixed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from ..adapters import base_model_of, check_lora_placement
from ..calibration import CalibrationRecord
from ..engine import attach
from ..fingerprint import library_versions, model_fingerprint
from ..gate import ExitGate, Policy, check_policy
from .card import model_card
from .format import (
    ADAPTER_NAME,
    CALIBRATION,
    FORMAT,
    GATE_CONFIG,
    GATE_WEIGHTS,
    MANIFEST,
    MODEL_CARD,
    check_gate_sizes,
    check_layout,
    dtype_name,
    hashed_files,
    hidden_size,
    image_token_id,
    sha256_of,
    write_json,
)


def export_gated_checkpoint(
    out_dir: str | os.PathLike,
    model: nn.Module,
    gate: ExitGate | None,
    calibration: CalibrationRecord | None,
    *,
    base_model_name_or_path: str,
    base_model_revision: str | None = None,
    policy: Policy = "gate",
    overwrite: bool = False,
) -> Path:
    """Write the gated checkpoint of a LoRA-adapted model to ``out_dir`` and return its path.

    ``model`` is a peft ``PeftModel`` whose LoRA sits on the language model only (a LoRA on
    the vision tower or projector is refused, docs/methods.md §14.4). ``base_model_name_or_path``
    is what loaders will load as the base (a directory, a hub id, or ``toy``). ``policy`` is
    the default exit policy at load; without a gate it is always ``fixed``.

    The directory is written into a temporary sibling and renamed into place, so a crash
    never leaves a half-written checkpoint; an existing non-empty ``out_dir`` is replaced
    only with ``overwrite=True``.
    """
    out = Path(out_dir)
    check_policy(policy)
    _check_exportable(model, gate, calibration)
    _check_target(out, overwrite)
    if gate is None:
        policy = "fixed"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _write_adapter(model, tmp, base_model_name_or_path, base_model_revision)
        if gate is not None:
            _write_gate(gate, tmp)
        if calibration is not None:
            calibration.save(tmp / CALIBRATION)
        manifest = _build_manifest(
            model, gate, calibration, base_model_name_or_path, base_model_revision, policy
        )
        (tmp / MODEL_CARD).write_text(model_card(manifest, gate, calibration, location=str(out)))
        manifest["files"] = {name: sha256_of(tmp / name) for name in hashed_files(tmp)}
        write_json(tmp / MANIFEST, manifest)
        check_layout(tmp)
        share_like_any_folder(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_exportable(model: nn.Module, gate: ExitGate | None, calibration: CalibrationRecord | None) -> None:
    """Refuse what would load wrongly later, while the trainer can still fix it."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"export_gated_checkpoint needs a peft PeftModel (the LoRA-adapted model), got {type(model).__name__}."
        )
    if list(model.peft_config) != [ADAPTER_NAME]:
        raise ValueError(
            f"export_gated_checkpoint saves exactly one adapter named {ADAPTER_NAME!r}; this model has "
            f"{list(model.peft_config)}. Merge or delete the others first."
        )
    controller = attach(model)
    check_lora_placement(model, controller.language_model, key="LoraConfig.target_modules")
    if gate is not None:
        check_gate_sizes(gate.config, controller, hidden_size(model), "the gate")
    if calibration is not None and calibration.num_layers != controller.num_layers:
        raise ValueError(
            f"The calibration record is for a {calibration.num_layers}-layer decoder; the model has "
            f"{controller.num_layers}. Recalibrate this model."
        )


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another output path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} is not empty; pass overwrite=True to replace it, or choose another output directory."
        )


def _write_adapter(model: nn.Module, tmp: Path, base: str, revision: str | None) -> None:
    """peft's own files, with the base recorded (peft would record whatever name_or_path was)."""
    config = model.peft_config[ADAPTER_NAME]
    saved = (config.base_model_name_or_path, config.revision)
    config.base_model_name_or_path, config.revision = base, revision
    try:
        model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
    finally:
        config.base_model_name_or_path, config.revision = saved


def _write_gate(gate: ExitGate, tmp: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in gate.state_dict().items()}
    save_file(state, str(tmp / GATE_WEIGHTS), metadata={"format": "pt", "vtw": FORMAT})
    gate.config.save(tmp / GATE_CONFIG)


def _build_manifest(
    model: nn.Module,
    gate: ExitGate | None,
    calibration: CalibrationRecord | None,
    base: str,
    revision: str | None,
    policy: str,
) -> dict[str, Any]:
    controller = attach(model)
    base_model = base_model_of(model)
    return {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "base_model": base,
        "base_model_revision": revision,
        "base_model_fingerprint": model_fingerprint(model),
        "base_model_dtype": dtype_name(model),
        "model_type": base_model.config.model_type,
        "model_class": type(base_model).__name__,
        "num_layers": controller.num_layers,
        "hidden_size": hidden_size(model),
        "image_token_id": image_token_id(base_model.config),
        "visual_token_ids": list(controller.visual_token_ids),
        "fallback_exit_layer": None if calibration is None else calibration.exit_layer,
        "policy": policy,
        "has_gate": gate is not None,
        "files": {},
    }


def share_like_any_folder(directory: Path) -> None:
    """Give the folder and its files the permissions a plain mkdir / open would (a temporary folder is 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory over ``out``; an old one is moved aside first, then deleted."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, trash / out.name)
    os.replace(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)
