"""FastV: after layer K - 1, keep only the visual tokens the last prompt token attends to most.

docs/methods.md §7. The attention row is recomputed from layer K - 1's own projections (as
PyramidDrop does), so SDPA stays on in every layer. Each sample keeps the same fraction of
its own visual tokens, chosen within its own spans; kept tokens keep their original
positions; layers from K on (and their KV cache) hold text plus the kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine.attention import query_attention_row


@dataclass(frozen=True)
class FastV:
    """FastV settings: prune at ``layer`` (K >= 1), keeping ``keep_ratio`` of each sample's visual tokens.

    Paper default: K = 2, prune R = 50% (keep_ratio 0.5). Use it as the engine's in-layer
    pruning: ``controller.using(pruning=FastV(layer=2, keep_ratio=0.5))``.
    """

    layer: int = 2
    keep_ratio: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(
                f"FastV layer must be an int >= 1 (it ranks tokens with layer K-1's attention); "
                f"got {self.layer!r}."
            )
        if not 0.0 <= self.keep_ratio <= 1.0:
            raise ValueError(f"FastV keep_ratio must be in [0, 1], got {self.keep_ratio}.")

    def kept_count(self, n_visual: int) -> int:
        return int(round(self.keep_ratio * n_visual))

    def select(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        visual: torch.Tensor,
        padding: torch.Tensor | None,
        visual_counts: list[int] | None = None,
    ) -> torch.Tensor:
        """Visual positions to keep ``[B, T]`` bool, from layer K-1's input ``hidden``.

        ``visual_counts``: each row's visual tokens when the caller knows them (counting them here
        reads the device, a host sync per row).
        """
        batch, length = visual.shape
        positions = torch.arange(length, device=visual.device).expand(batch, -1)
        real = torch.ones_like(visual) if padding is None else padding.bool()
        last = torch.where(real, positions, -1).max(dim=1).values
        key_mask = real & (positions <= last.unsqueeze(1))
        with torch.no_grad():
            row = query_attention_row(layer, hidden, cos, sin, last, key_mask)
        scores = row.masked_fill(~(visual & real), float("-inf"))
        if visual_counts is None:
            visual_counts = (visual & real).sum(1).tolist()
        keep = torch.zeros_like(visual)
        for b in range(batch):
            k = self.kept_count(int(visual_counts[b]))
            if k:
                keep[b, scores[b].topk(k).indices] = True
        return keep
