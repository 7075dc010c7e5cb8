"""A ``DynamicCache`` that remembers how visual tokens were withdrawn at prefill.

Decoding after a withdrawn prefill needs per-layer masks: layers that every sample ran
in full keep the full stream, layers after every sample's exit hold the text stream only,
and layers in between (per-sample exits) hold one group of rows per layout
(:class:`~vtw_train.engine.grouped.GroupedLayer`), so each sample keeps only what it needs at
its own exit. That state must follow the cache through beam search reordering, batch
selection and cropping, which is why it lives here and not on the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .grouped import FULL, REDUCED, TEXT, GroupedLayer

#: A layer whose cache holds groups of rows in different streams (per-sample exits).
MIXED = "mixed"
__all__ = ["FULL", "MIXED", "REDUCED", "TEXT", "ExitState", "WithdrawalCache", "kv_bytes"]


@dataclass
class ExitState:
    """Per-request withdrawal state, fixed at prefill and extended by every decode step."""

    exit_layers: torch.Tensor  # [B] long, K per sample (num_layers = never withdrawn)
    visual: torch.Tensor  # [B, T_prompt] bool, visual positions of the prompt
    full_mask: torch.Tensor  # [B, S_full] long, padding mask of the full stream incl. generated tokens
    text_mask: torch.Tensor  # [B, S_text] long, padding mask of the text stream incl. generated tokens
    layer_streams: list[str]  # per layer, on the host: FULL, REDUCED, TEXT or MIXED (grouped)
    reduced_mask: torch.Tensor | None = None  # [B, S_reduced] long, FastV's stream (None: no FastV)

    def stream_masks(self) -> dict[str, torch.Tensor]:
        """The padding mask of every stream this request's cache uses."""
        masks = {FULL: self.full_mask, TEXT: self.text_mask}
        if self.reduced_mask is not None:
            masks[REDUCED] = self.reduced_mask
        return masks

    def _map(self, change) -> dict[str, torch.Tensor | None]:
        reduced = None if self.reduced_mask is None else change(self.reduced_mask)
        return {
            "full_mask": change(self.full_mask),
            "text_mask": change(self.text_mask),
            "reduced_mask": reduced,
        }

    def append(self, new_columns: torch.Tensor) -> None:
        new_columns = new_columns.to(self.full_mask.dtype)
        for name, mask in self._map(lambda m: torch.cat([m, new_columns], dim=1)).items():
            setattr(self, name, mask)

    def select_rows(self, index: torch.Tensor) -> ExitState:
        """The state of the selected rows (each layer's stream does not depend on the rows)."""
        return replace(
            self,
            exit_layers=self.exit_layers[index],
            visual=self.visual[index],
            **self._map(lambda m: m[index]),
        )

    def crop(self, tokens_to_remove: int) -> None:
        generated = self.full_mask.shape[1] - self.visual.shape[1]
        if tokens_to_remove > generated:
            raise ValueError(
                f"Cannot crop {tokens_to_remove} tokens from a withdrawn cache: only {generated} were generated "
                "after the prompt, and the prompt's visual tokens are already gone from deep layers."
            )
        if tokens_to_remove:
            for name, mask in self._map(lambda m: m[:, :-tokens_to_remove]).items():
                setattr(self, name, mask)


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
            self.exit_state = self.exit_state.select_rows(beam_idx.to(self.exit_state.exit_layers.device))

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
            self.exit_state = self.exit_state.select_rows(index.repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        # transformers 5.x only accepts a negative count here (the number of tokens to drop).
        if self.exit_state is not None and tokens_to_remove < 0:
            self.exit_state.crop(-tokens_to_remove)
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        # A grouped layer belongs to the prefill that made it; the next one starts from plain layers.
        self.layers = [DynamicLayer() if isinstance(layer, GroupedLayer) else layer for layer in self.layers]
        self.exit_state = None


def kv_bytes(cache: object) -> int:
    """Bytes held by a cache's keys and values over all layers (grouped layers counted group by group)."""
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        if isinstance(layer, GroupedLayer):
            total += layer.nbytes()
            continue
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
