"""A ``DynamicCache`` that remembers how visual tokens were withdrawn at prefill.

Decoding after a withdrawn prefill needs per-layer masks: layers that every sample ran
in full keep the full stream, layers after every sample's exit hold the text stream only,
and layers in between (per-sample exits) keep the full layout with the exited samples'
visual slots masked. That state must follow the cache through beam search reordering,
batch selection and cropping, which is why it lives here and not on the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache

FULL, TEXT, MIXED = "full", "text", "mixed"


@dataclass
class ExitState:
    """Per-request withdrawal state, fixed at prefill and extended by every decode step."""

    exit_layers: torch.Tensor  # [B] long, K per sample (num_layers = never withdrawn)
    visual: torch.Tensor  # [B, T_prompt] bool, visual positions of the prompt
    full_mask: torch.Tensor  # [B, S_full] long, padding mask of the full stream incl. generated tokens
    text_mask: torch.Tensor  # [B, S_text] long, padding mask of the text stream incl. generated tokens
    num_layers: int
    host_exits: list[int] | None = None  # the same exit layers on the host (None: read them when needed)
    _layouts: list[str] | None = None

    def layouts(self) -> list[str]:
        """Layout of every layer, computed once on the host (the exit layers are fixed after prefill)."""
        if self._layouts is None:
            if self.host_exits is None:
                self.host_exits = [
                    int(k) for k in self.exit_layers.tolist()
                ]  # one read, after a row selection
            self._layouts = [self.layout_of(layer) for layer in range(self.num_layers)]
        return self._layouts

    def layout_of(self, layer: int) -> str:
        exits = (
            self.host_exits if self.host_exits is not None else [int(k) for k in self.exit_layers.tolist()]
        )
        if all(k > layer for k in exits):
            return FULL
        if all(k <= layer for k in exits):
            return TEXT
        return MIXED

    def mixed_mask(self, layer: int) -> torch.Tensor:
        """Full-stream mask with visual columns hidden for samples that exited by ``layer``."""
        exited = (self.exit_layers <= layer).unsqueeze(1)
        hide = torch.zeros_like(self.full_mask, dtype=torch.bool)
        hide[:, : self.visual.shape[1]] = self.visual & exited
        return self.full_mask.masked_fill(hide, 0)

    def append(self, new_columns: torch.Tensor) -> None:
        new_columns = new_columns.to(self.full_mask.dtype)
        self.full_mask = torch.cat([self.full_mask, new_columns], dim=1)
        self.text_mask = torch.cat([self.text_mask, new_columns], dim=1)

    def select_rows(self, index: torch.Tensor, same_exits: bool = False) -> ExitState:
        """The state of the selected rows. ``same_exits``: the rows' exit layers are a permutation of
        the old ones (beam reordering within each prompt), so every layer's layout is unchanged."""
        keep = same_exits and self._layouts is not None
        return replace(
            self,
            _layouts=self._layouts if keep else None,
            host_exits=self.host_exits if keep else None,
            exit_layers=self.exit_layers[index],
            visual=self.visual[index],
            full_mask=self.full_mask[index],
            text_mask=self.text_mask[index],
        )

    def crop(self, tokens_to_remove: int) -> None:
        generated = self.full_mask.shape[1] - self.visual.shape[1]
        if tokens_to_remove > generated:
            raise ValueError(
                f"Cannot crop {tokens_to_remove} tokens from a withdrawn cache: only {generated} were generated "
                "after the prompt, and the prompt's visual tokens are already gone from deep layers."
            )
        if tokens_to_remove:
            self.full_mask = self.full_mask[:, :-tokens_to_remove]
            self.text_mask = self.text_mask[:, :-tokens_to_remove]


class WithdrawalCache(DynamicCache):
    """DynamicCache plus :class:`ExitState`.

    ``get_seq_length()`` with no layer index answers the full-stream length, which is what
    every caller of that form wants (position ids, ``generate()`` bookkeeping, Qwen2-VL's
    rope deltas); with an explicit layer index it answers that layer's own length, which is
    what the mask builder asks for. With K = 0 the two differ (docs/engine.md, trap 2).
    """

    exit_state: ExitState | None = None

    @classmethod
    def promote(cls, cache: DynamicCache) -> WithdrawalCache:
        """Turn an empty ``DynamicCache`` into a ``WithdrawalCache`` in place.

        In place, because ``generate()`` and users hold the object they passed in and expect
        the next call with the same object to continue from it.
        """
        if type(cache) is not DynamicCache and not isinstance(cache, WithdrawalCache):
            raise TypeError(
                f"Visual-token withdrawal needs a DynamicCache, got {type(cache).__name__}. "
                "StaticCache and other fixed-size caches are not supported; use the default cache."
            )
        cache.__class__ = cls
        cache.exit_state = None
        return cache  # type: ignore[return-value]

    def get_seq_length(self, layer_idx: int | None = None) -> int:
        if layer_idx is None:
            if self.exit_state is not None:
                return int(self.exit_state.full_mask.shape[1])
            layer_idx = 0
        return super().get_seq_length(layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.exit_state is not None:
            # Beams are reordered within each prompt, and a prompt's beams share its exit layer.
            self.exit_state = self.exit_state.select_rows(
                beam_idx.to(self.exit_state.exit_layers.device), same_exits=True
            )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.exit_state is not None:
            self.exit_state = self.exit_state.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.exit_state is not None:
            index = torch.arange(
                self.exit_state.exit_layers.shape[0], device=self.exit_state.exit_layers.device
            )
            self.exit_state = self.exit_state.select_rows(index.repeat_interleave(repeats), same_exits=True)

    def crop(self, tokens_to_remove: int) -> None:
        # transformers 5.x only accepts a negative count here (the number of tokens to drop).
        if self.exit_state is not None and tokens_to_remove < 0:
            self.exit_state.crop(-tokens_to_remove)
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self.exit_state = None
