"""Index bookkeeping for the text-only stream.

After withdrawal every sample keeps its non-visual, non-padding tokens, at their original
positions. Samples keep different numbers of them (different image counts, anyres,
padding), so the text stream is re-padded on the left into a rectangle ``[B, T_text]``:
left padding is what decoding appends to, and it matches how ``generate()`` pads prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextLayout:
    """Where each text slot comes from in the full stream.

    ``index[b, j]`` is the full-stream position of text slot ``j`` of sample ``b``; padding
    slots point at position 0 (their values are masked out and never scattered back).
    ``valid[b, j]`` is False on padding slots.
    """

    index: torch.Tensor  # [B, T_text] long
    valid: torch.Tensor  # [B, T_text] bool
    full_length: int

    @property
    def length(self) -> int:
        return self.index.shape[1]

    def select(self, rows: torch.Tensor | None, width: int) -> TextLayout:
        """The layout of ``rows`` only (all rows when None), cut to their last ``width`` slots."""
        index, valid = self.index, self.valid
        if rows is not None:
            index, valid = index[rows], valid[rows]
        start = self.length - width
        return TextLayout(index=index[:, start:], valid=valid[:, start:], full_length=self.full_length)

    def rows_index(self, rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, valid)`` of ``rows``, cut to the last ``width`` slots (left padding keeps text at the right)."""
        start = self.length - width
        return self.index[rows, start:], self.valid[rows, start:]

    def gather(
        self, full: torch.Tensor, rows: torch.Tensor | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Gather ``full`` (``[b, T, ...]``) into the text layout for ``rows`` (default: all).

        ``full`` holds exactly the ``rows`` (or every row); ``width`` cuts the layout to those
        rows' longest text.
        """
        index = self.index if rows is None else self.index[rows]
        if width is not None:
            index = index[:, self.length - width :]
        shape = index.shape + full.shape[2:]
        expanded = index.view(*index.shape, *([1] * (full.dim() - 2))).expand(shape)
        return torch.gather(full, 1, expanded)

    def spread(self, text: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Layout states of ``rows`` (``[n, width, ...]``) at their full-stream positions (``[n, T, ...]``, zeros
        elsewhere): how a row leaves one reduced layout for another (FastV's stream for the text stream)."""
        t = self.full_length
        index, valid = self.rows_index(rows, text.shape[1])
        index = torch.where(valid, index, t)
        buffer = text.new_zeros((len(rows), t + 1, *text.shape[2:]))
        expanded = index.view(*index.shape, *([1] * (text.dim() - 2))).expand(text.shape)
        return buffer.scatter(1, expanded, text)[:, :t]

    def scatter(
        self, text: torch.Tensor, full: torch.Tensor, rows: torch.Tensor, keep_others: bool = False
    ) -> torch.Tensor:
        """Write text-layout states of ``rows`` back into a copy of ``full`` at their positions.

        ``text`` may be cut to the rows' own width. Padding slots are routed to a spare column
        that is dropped, so they never overwrite a real position. The other positions of those
        rows are zeroed (withdrawn tokens), or keep ``full``'s values with ``keep_others``
        (ShortV's frozen visual tokens).
        """
        b, t = full.shape[:2]
        index, valid = self.rows_index(rows, text.shape[1])
        index = torch.where(valid, index, t)
        buffer = full.new_zeros((len(rows), t + 1, *full.shape[2:]))
        if keep_others:
            buffer[:, :t] = full[rows]
        expanded = index.view(*index.shape, *([1] * (full.dim() - 2))).expand(text.shape)
        buffer = buffer.scatter(1, expanded, text)
        out = full.clone()
        out[rows] = buffer[:, :t]
        return out


def build_text_layout(
    visual: torch.Tensor, padding: torch.Tensor | None, text_length: int | None = None
) -> TextLayout:
    """Build the left-padded text layout from the visual mask and the 2-D padding mask.

    ``visual``: ``[B, T]`` bool, True at visual positions (the tokens left out). ``padding``:
    ``[B, T]`` with 1 at real tokens, or None for no padding. ``text_length``: the longest row's
    kept count, when the caller knows it (reading it from the device is a host sync).
    """
    batch, length = visual.shape
    keep = ~visual
    if padding is not None:
        keep = keep & padding.bool()
    counts = keep.sum(dim=1)
    if text_length is None:
        text_length = int(counts.max().item()) if batch else 0
    # Stable sort puts kept positions last, in their original order: exactly left padding.
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)
    index = order[:, length - text_length :] if text_length else order[:, :0]
    slots = torch.arange(text_length, device=visual.device).unsqueeze(0)
    valid = slots >= (text_length - counts).unsqueeze(1)
    index = torch.where(valid, index, torch.zeros_like(index))
    return TextLayout(index=index, valid=valid, full_length=length)
