"""LLaVA-1.5 and LLaVA-NeXT (Llama, Mistral and Qwen2 backbones).

Visual positions are the image placeholder tokens after expansion; for LLaVA-NeXT anyres
the per-row ``image_newline`` features are written into placeholder positions too, so the
same test finds them and per-image counts may differ.
"""

from __future__ import annotations

from torch import nn

from .base import FamilyAdapter


class LlavaAdapter(FamilyAdapter):
    model_classes = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")

    def visual_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.image_token_id),)
