"""Building padded batches from single samples, so batched results can be checked against them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vtw_train.tiny_models import PAD_TOKEN_ID, tiny_inputs


def singles(model: Any, specs: Sequence[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """One unpadded batch-1 input per spec (keyword arguments of ``tiny_inputs``)."""
    out = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        lengths = spec.pop("text_length", None)
        images = spec.pop("images", None)
        sizes = spec.pop("image_sizes", None)
        out.append(
            tiny_inputs(
                model,
                batch_size=1,
                text_lengths=None if lengths is None else [lengths],
                images_per_sample=None if images is None else [images],
                image_sizes=sizes,
                seed=spec.pop("seed", 100 + i),
            )
        )
    return out


def collate(
    samples: Sequence[dict[str, torch.Tensor]], padding_side: str = "left"
) -> dict[str, torch.Tensor]:
    """Pad single samples into one batch the way a processor would."""
    length = max(s["input_ids"].shape[1] for s in samples)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        missing = length - t.shape[1]
        return F.pad(t, (missing, 0) if padding_side == "left" else (0, missing), value=value)

    batch: dict[str, torch.Tensor] = {
        "input_ids": torch.cat([pad(s["input_ids"], PAD_TOKEN_ID) for s in samples]),
        "attention_mask": torch.cat([pad(s["attention_mask"], 0) for s in samples]),
    }
    if any("mm_token_type_ids" in s for s in samples):
        batch["mm_token_type_ids"] = torch.cat([pad(s["mm_token_type_ids"], 0) for s in samples])
    pixels = [s["pixel_values"] for s in samples if "pixel_values" in s]
    if pixels and pixels[0].dim() == 5:  # LLaVA-NeXT: [images, patches, C, H, W]; pad patches
        most = max(p.shape[1] for p in pixels)
        pixels = [F.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    for key in ("image_sizes", "image_grid_thw"):
        if any(key in s for s in samples):
            batch[key] = torch.cat([s[key] for s in samples if key in s])
    return batch


def real_rows(batch: dict[str, torch.Tensor], row: int) -> torch.Tensor:
    """Indices of the non-padding positions of one row."""
    return batch["attention_mask"][row].nonzero().squeeze(1)
