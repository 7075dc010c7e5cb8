"""Loading the model a script works on: a saved Hugging Face directory, the embedded toy, or a tiny random one."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

DTypeName = Literal["float32", "bfloat16", "float16"]


@dataclass
class ModelSpec:
    """Which model to load: a saved directory, the embedded toy (``toy``), or a tiny random model."""

    path: str | None = None
    """A directory saved with ``save_pretrained`` (loaded with AutoModelForImageTextToText and
    AutoProcessor), or ``toy`` for the embedded default model shipped with vtw-train."""
    tiny_family: str | None = None
    """Instead of ``path``, build a tiny random model of this family (llava, llava-mistral,
    llava-qwen2, llava_next, qwen2_vl, qwen2_5_vl); it has no processor."""
    num_layers: int = 8
    """Decoder depth of the tiny random model."""
    hidden_size: int = 64
    """Width of the tiny random model."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention backend."""
    dtype: DTypeName = "float32"
    """Weights dtype."""
    seed: int = 0
    """Seed of the tiny random model's weights."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.tiny_family is None):
            raise ValueError(
                "model: set exactly one of 'path' (a saved model dir or 'toy') and 'tiny_family'."
            )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(path: str) -> Path | str:
    """A local model directory, ``toy`` (the embedded default), or a Hugging Face hub id.

    Hub ids (``org/name`` that is not a local path) are passed through to ``from_pretrained``,
    which downloads them where a hub is reachable; local directories must hold a config.json.
    """
    if path == "toy":
        from .toy import toy_vlm_path

        toy = toy_vlm_path()
        if not (toy / "config.json").is_file() or not (toy / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"The embedded toy model is missing from {toy}. Rebuild it with "
                "`python scripts/build_toy_vlm.py --config configs/toy/toy_vlm.yaml`."
            )
        return toy
    resolved = Path(path).expanduser()
    if (resolved / "config.json").is_file():
        return resolved
    if not resolved.exists() and _HUB_ID.match(path):
        return path
    raise FileNotFoundError(
        f"model path {path!r}: no config.json there. Give a directory written by save_pretrained, a hub id "
        "(org/name), or 'toy' for the embedded default."
    )


def load_model(spec: ModelSpec) -> tuple[nn.Module, Any | None]:
    """Return ``(model, processor)`` in eval mode; the processor is None for tiny random models."""
    dtype = getattr(torch, spec.dtype)
    if spec.tiny_family is not None:
        from .tiny_models import tiny_model

        model = tiny_model(
            spec.tiny_family,
            num_layers=spec.num_layers,
            attn_implementation=spec.attn_implementation,
            seed=spec.seed,
            **({"hidden_size": spec.hidden_size} if spec.tiny_family.startswith("llava") else {}),
        )
        return model.to(dtype).eval(), None
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_model_path(spec.path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation=spec.attn_implementation
    )
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor
