"""Qwen2-VL and Qwen2.5-VL.

Images and videos both count as visual. Position ids are M-RoPE: ``[3, B, T]`` (temporal,
height, width), or ``[4, B, T]`` during ``generate()`` where row 0 carries the plain text
positions that the mask builder needs (see docs/engine.md, trap 11).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import FamilyAdapter, SplitPositions


class Qwen2VLAdapter(FamilyAdapter):
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")

    def visual_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        ids = [int(model.config.image_token_id)]
        video = getattr(model.config, "video_token_id", None)
        if video is not None:
            ids.append(int(video))
        return tuple(ids)

    def split_positions(self, position_ids: torch.Tensor) -> SplitPositions:
        if position_ids.dim() == 2:
            return SplitPositions(rope=position_ids.unsqueeze(0).expand(3, -1, -1), text=None)
        if position_ids.shape[0] == 4:
            return SplitPositions(rope=position_ids[1:], text=position_ids[0])
        return SplitPositions(rope=position_ids, text=None)

    def default_positions(self, start: int, length: int, batch: int, device: torch.device) -> SplitPositions:
        pos = torch.arange(length, device=device) + start
        return SplitPositions(rope=pos.view(1, 1, -1).expand(3, batch, -1), text=None)
