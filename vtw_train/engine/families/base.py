"""What the engine needs to know about one model family.

The engine itself is family-agnostic: it patches the text decoder's ``forward`` and reads
visual positions from ``input_ids``. Everything that differs between LLaVA-style and
Qwen2-VL-style models (where the decoder lives, which token ids are visual, how position
ids are laid out) sits behind this small interface, so adding a family is one module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SplitPositions:
    """Position ids separated into what RoPE needs and what the mask builder needs.

    ``rope`` is handed to the rotary module unchanged (``[B, T]`` for Llama-style models,
    ``[3, B, T]`` for M-RoPE). ``text`` is the plain 1-D-per-row position (``[B, T]`` or None)
    that stock code passes to ``create_causal_mask`` and to the decoder layers.
    """

    rope: torch.Tensor
    text: torch.Tensor | None


class FamilyAdapter:
    """Base class for one multimodal family. Subclasses set ``model_classes`` and override hooks."""

    #: class names (``type(model).__name__``) this adapter accepts
    model_classes: tuple[str, ...] = ()

    def wrapper(self, model: nn.Module) -> nn.Module:
        """The multimodal module whose ``forward`` receives ``input_ids`` (``model.model``)."""
        return model.model

    def language_model(self, model: nn.Module) -> nn.Module:
        """The text decoder (``LlamaModel``, ``Qwen2Model``, ``Qwen2VLTextModel``...)."""
        return model.model.language_model

    def visual_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        """Token ids whose positions hold visual features after placeholder expansion."""
        raise NotImplementedError

    def split_positions(self, position_ids: torch.Tensor) -> SplitPositions:
        """Separate rotary positions from mask positions, as the family's stock forward does."""
        return SplitPositions(rope=position_ids, text=position_ids)

    def default_positions(self, start: int, length: int, batch: int, device: torch.device) -> SplitPositions:
        """Positions the stock decoder uses when it is given none (arange after the cache)."""
        pos = (torch.arange(length, device=device) + start).unsqueeze(0)
        return SplitPositions(rope=pos, text=pos)

    @staticmethod
    def gather_rope_positions(rope: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Gather rotary positions along the sequence for the text-only layout (keeps original values)."""
        if rope.dim() == 2:
            return torch.gather(rope.expand(index.shape[0], -1), 1, index)
        # M-RoPE: [3, B, T]
        expanded = rope.expand(rope.shape[0], index.shape[0], -1)
        return torch.gather(expanded, 2, index.unsqueeze(0).expand(rope.shape[0], -1, -1))
