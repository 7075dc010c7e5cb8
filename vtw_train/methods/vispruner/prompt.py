"""Rewriting a prompt after VisPruner: shorter placeholder runs, re-padded per-token tensors, Qwen2-VL positions.

Each image's placeholder run in ``input_ids`` is shortened to its kept count, and every per-token
tensor (``attention_mask``, ``labels``, ``mm_token_type_ids``, ``token_type_ids``) is shortened
with it and re-padded on the side it was padded on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# Per-token inputs that are shortened with input_ids, and their padding values (None: the pad id).
PER_TOKEN_KEYS: dict[str, int | None] = {
    "input_ids": None,
    "attention_mask": 0,
    "labels": -100,
    "mm_token_type_ids": 0,
    "token_type_ids": 0,
}
# Inputs that only serve to encode the images; the pruned features replace them.
CONSUMED_KEYS = ("pixel_values", "image_sizes", "image_grid_thw")
REJECTED_KEYS = {
    "inputs_embeds": "pass input_ids; the placeholders are located from them",
    "position_ids": "positions are derived from the pruned prompt (LLaVA) or gathered from the full one (Qwen2-VL)",
    "mm_encoder_outputs": "pass pixel_values; VisPruner needs the vision tower's internals, not its outputs",
    "pixel_values_videos": "video inputs are not supported by VisPruner here",
    "video_grid_thw": "video inputs are not supported by VisPruner here",
    "past_key_values": "prune a fresh prompt, before any cache exists",
}


def padding_side(mask: torch.Tensor) -> str:
    """'left' or 'right' from a 0/1 mask [B, N]; rows without padding fit either side."""
    m = mask.bool()
    left = bool((m[:, 1:] >= m[:, :-1]).all())  # 0...0 1...1
    right = bool((m[:, 1:] <= m[:, :-1]).all())  # 1...1 0...0
    if left:
        return "left"
    if right:
        return "right"
    raise ValueError(
        "attention_mask must be contiguous left or right padding (one side for the whole batch); "
        "holes inside a row, or left- and right-padded rows mixed, are not supported"
    )


def assign_images(
    is_image: torch.Tensor, valid: torch.Tensor, counts: Sequence[int]
) -> tuple[list[int], list[torch.Tensor]]:
    """Give each image its placeholder positions: image k takes the next ``counts[k]`` image tokens in
    row-major order, the same order in which the model scatters feature rows."""
    per_sample = [(img & ok).nonzero().squeeze(1) for img, ok in zip(is_image, valid, strict=True)]
    available = [int(p.numel()) for p in per_sample]

    def mismatch(detail: str) -> ValueError:
        return ValueError(
            f"{detail} (image tokens per sample: {available}, feature rows per image: {list(counts)}); "
            "were the prompts truncated, or built for other images?"
        )

    owners: list[int] = []
    slots: list[torch.Tensor] = []
    used = [0] * len(per_sample)
    sample = 0
    for k, count in enumerate(counts):
        while sample < len(per_sample) and used[sample] == available[sample]:
            sample += 1
        if sample == len(per_sample) or used[sample] + count > available[sample]:
            raise mismatch(f"image {k} needs {count} placeholder tokens that the prompt does not have")
        owners.append(sample)
        slots.append(per_sample[sample][used[sample] : used[sample] + count])
        used[sample] += count
    if used != available:
        raise mismatch("some samples have more image tokens than their images produce features")
    return owners, slots


def repack(tensor: torch.Tensor, keep: torch.Tensor, pad_value: int, side: str) -> torch.Tensor:
    lengths = keep.sum(dim=1)
    width = int(lengths.max()) if lengths.numel() else 0
    out = tensor.new_full((tensor.shape[0], width), pad_value)
    for b in range(tensor.shape[0]):
        values = tensor[b][keep[b]]
        if side == "left":
            out[b, width - values.numel() :] = values
        else:
            out[b, : values.numel()] = values
    return out


def repack_positions(positions: torch.Tensor, keep: torch.Tensor, side: str) -> torch.Tensor:
    """Gather [3, B, N] M-RoPE ids at kept positions and re-pad (0 at padding, like get_rope_index)."""
    rows = [repack(positions[r], keep, 0, side) for r in range(positions.shape[0])]
    return torch.stack(rows, dim=0)


def pad_token_id(model: Any, input_ids: torch.Tensor, valid: torch.Tensor) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config.get_text_config(), "pad_token_id", None)
    if pad is None and bool((~valid).any()):
        pad = int(input_ids[~valid][0])
    return 0 if pad is None else int(pad)
