"""Cheap, stable fingerprints of a model's weights and of calibration data, and the library versions.

Calibration records and gated checkpoints are only valid for the model (and data) they were
made with; loaders compare fingerprints so a mismatch is an error rather than a silent
quality loss. Hashing every byte of a 7B model takes minutes, so each tensor contributes its
name, shape, dtype and a fixed strided sample of its values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

from .adapters import base_model_of

_SAMPLES_PER_TENSOR = 4096


def _tensor_digest(h: hashlib._Hash, tensor: torch.Tensor) -> None:
    flat = tensor.detach().reshape(-1)
    if flat.numel() > _SAMPLES_PER_TENSOR:
        step = flat.numel() // _SAMPLES_PER_TENSOR
        flat = flat[::step][:_SAMPLES_PER_TENSOR]
    h.update(flat.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the base model's parameters (LoRA adapters and gates are excluded)."""
    base = base_model_of(model)
    h = hashlib.sha256(type(base).__name__.encode())
    for name, param in base.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        name = name.replace(".base_layer.", ".")
        h.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        _tensor_digest(h, param)
    return "sha256:" + h.hexdigest()


def data_fingerprint(batches: Iterable[dict[str, torch.Tensor]]) -> str:
    """sha256 over the token ids (and sampled pixels) of calibration batches."""
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                h.update(key.encode())
                h.update(str(tuple(value.shape)).encode())
                _tensor_digest(h, value)
    return "sha256:" + h.hexdigest()


def library_versions() -> dict[str, str]:
    """The versions a record or checkpoint was made with (written next to it, for bug reports)."""
    import peft
    import transformers

    from . import __version__

    return {
        "vtw-train": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
