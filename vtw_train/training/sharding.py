"""Helpers for Lightning's own sharding strategies (nothing home-made: FSDP and DeepSpeed do the work)."""

from __future__ import annotations

from torch import nn

_BLOCK_SUFFIXES = ("DecoderLayer", "EncoderLayer", "VisionBlock")


def wrap_transformer_blocks(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy: one FSDP unit per transformer block, for any supported family.

    Keying on class-name suffixes (LlamaDecoderLayer, Qwen2VLDecoderLayer, CLIPEncoderLayer,
    Qwen2VLVisionBlock, ...) keeps the shipped FSDP config valid for every model config.
    """
    if recurse:
        return True
    return type(module).__name__.endswith(_BLOCK_SUFFIXES)
