"""Keys and values of a mixed layer, kept per group of samples: the cache shrinks with each sample's exit.

In a layer where some samples have withdrawn their visual tokens and others have not, the two
groups ran apart in the prefill (one in the full layout, one in the text layout). Keeping one
full-layout tensor for the whole batch would hold every visual slot of every sample, used or not,
and decode would read all of it at every step. :class:`GroupedLayer` keeps each group's keys and
values as its own rectangle instead, so a sample costs what it needs at its own exit (padding
within its group aside), and decode reads only that.

Decode still runs each decoder layer once for the whole batch (its projections and MLP read the
weights once); only attention is split: the grouped layer's ``update`` hands attention a
:class:`GroupedKV`, and :func:`grouped_attention` (registered with transformers' attention
interface as ``vtw_grouped``) runs the model's own attention per group and puts the rows back.
The engine selects it for those layers only, by the text config's attention implementation, for
the duration of the layer call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

GROUPED = "vtw_grouped"
#: The streams a layer's keys and values can be in: the whole prompt, FastV's reduced prompt, text only.
FULL, REDUCED, TEXT = "full", "reduced", "text"


@dataclass
class KVGroup:
    """Rows of the batch that share a layout in one layer, and their keys and values ``[n, H, S, d]``.

    ``layout``: the stream the rows are in (:data:`FULL`, :data:`REDUCED` or :data:`TEXT`).
    ``offset``: how many leading columns of the batch's mask of that stream this group does not
    hold (a re-padded group is padded to its own longest row only).
    """

    rows: list[int]
    layout: str
    keys: torch.Tensor
    values: torch.Tensor
    offset: int = 0


@dataclass
class GroupedKV:
    """What a grouped layer's ``update`` returns in place of the key (or value) tensor."""

    layer: GroupedLayer
    part: str  # "keys" or "values"


@dataclass
class GroupedMask:
    """Per-group attention masks of one grouped layer, and the attention the groups run with."""

    masks: list[Any]
    implementation: str


def device_index(rows: list[int], device: torch.device) -> torch.Tensor:
    """A small host list as a device index, copied without draining the device's queue."""
    host = torch.tensor(rows, dtype=torch.long)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class GroupedLayer(DynamicLayer):
    """One decoder layer's cache held per group of rows (see the module docstring).

    The groups' rows, concatenated, are a permutation of the batch: ``order`` gathers the batch
    into group order with one ``index_select`` and ``restore`` puts it back with another, so the
    per-step cost of splitting does not grow with the number of groups beyond their attention calls.
    """

    def __init__(self, groups: list[KVGroup], batch: int) -> None:
        super().__init__()
        self.groups = [g for g in groups if g.rows]
        self.batch = batch
        self.is_initialized = True
        first = self.groups[0].keys
        self.dtype, self.device = first.dtype, first.device
        self._index()

    def _index(self) -> None:
        flat = [row for group in self.groups for row in group.rows]
        if sorted(flat) != list(range(self.batch)):
            raise ValueError(f"groups must cover rows 0..{self.batch - 1} once each, got {flat}")
        self.order = device_index(flat, self.device)
        restore = [0] * self.batch
        for position, row in enumerate(flat):
            restore[row] = position
        self.restore = device_index(restore, self.device)
        self.identity = flat == list(range(self.batch))
        self.sizes = [len(group.rows) for group in self.groups]

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``tensor``'s rows (batch order) as one view per group."""
        ordered = tensor if self.identity else tensor.index_select(0, self.order)
        return list(ordered.split(self.sizes))

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split`."""
        joined = torch.cat(parts)
        return joined if self.identity else joined.index_select(0, self.restore)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.groups for t in (g.keys, g.values))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        for group, keys, values in zip(
            self.groups, self.split(key_states), self.split(value_states), strict=True
        ):
            group.keys = torch.cat([group.keys, keys], dim=-2)
            group.values = torch.cat([group.values, values], dim=-2)
        return GroupedKV(self, "keys"), GroupedKV(self, "values")

    def get_seq_length(self) -> int:
        return max(group.keys.shape[-2] for group in self.groups)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beams are reordered within each prompt, and a prompt's beams share its exit: every row stays in its group.

        So each group's new rows are a reordering of its own: ``restore[beam_idx]`` (in group order)
        minus the group's start is each new row's source within the group, and no row changes group.
        """
        source = self.split(self.restore.index_select(0, beam_idx.to(self.device)))
        start = 0
        for group, within in zip(self.groups, source, strict=True):
            within = within - start
            group.keys, group.values = (
                group.keys.index_select(0, within),
                group.values.index_select(0, within),
            )
            start += len(group.rows)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for group in self.groups:
            group.rows = [r * repeats + j for r in group.rows for j in range(repeats)]
            group.keys = group.keys.repeat_interleave(repeats, dim=0)
            group.values = group.values.repeat_interleave(repeats, dim=0)
        self.batch *= repeats
        self._index()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        chosen = [int(i) for i in indices.tolist()]  # rows can leave a group: read once, rarely called
        groups = []
        for group in self.groups:
            where = {row: pos for pos, row in enumerate(group.rows)}
            new_rows = [new for new, old in enumerate(chosen) if old in where]
            if new_rows:
                pos = device_index([where[chosen[new]] for new in new_rows], self.device)
                keys, values = group.keys.index_select(0, pos), group.values.index_select(0, pos)
                groups.append(KVGroup(new_rows, group.layout, keys, values, group.offset))
        self.groups, self.batch = groups, len(chosen)
        self._index()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove:
            for group in self.groups:
                group.keys = group.keys[..., :tokens_to_remove, :]
                group.values = group.values[..., :tokens_to_remove, :]


def group_masks(
    layer: GroupedLayer,
    stream_masks: dict[str, torch.Tensor],
    query_length: int,
    config: Any,
    dtype: torch.dtype,
    built: dict[Any, Any],
) -> GroupedMask:
    """The attention mask of each group of ``layer`` for the current decode step.

    ``stream_masks``: the batch's 2-D padding mask of each stream, new tokens included. ``built``
    is shared by the layers of one step: layers whose groups are the same rows reuse one mask, so
    the masks built per step grow with the number of distinct exits, not with depth.
    """
    implementation = config._attn_implementation
    build = ALL_MASK_ATTENTION_FUNCTIONS[implementation]
    masks = []
    for group in layer.groups:
        key = (group.layout, group.offset, tuple(group.rows))
        if key not in built:
            padding = stream_masks[group.layout][:, group.offset :]
            padding = padding.index_select(0, device_index(group.rows, padding.device)).bool()
            length = padding.shape[1]
            built[key] = build(
                batch_size=len(group.rows),
                q_length=query_length,
                kv_length=length,
                q_offset=length - query_length,
                kv_offset=0,
                mask_function=causal_mask_function,
                attention_mask=padding,
                allow_is_causal_skip=False,
                dtype=dtype,
                device=padding.device,
                config=config,
            )
        masks.append(built[key])
    return GroupedMask(masks, implementation)


def grouped_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention of a grouped layer: the model's own attention, run per group of rows, rows put back."""
    if not isinstance(key, GroupedKV) or not isinstance(attention_mask, GroupedMask):
        raise TypeError("vtw_grouped attention is only used for layers whose cache holds groups of rows")
    layer = key.layer
    base = ALL_ATTENTION_FUNCTIONS.get_interface(attention_mask.implementation, eager_attention_forward)
    outputs = []
    for group, q, mask in zip(layer.groups, layer.split(query), attention_mask.masks, strict=True):
        result, _ = base(module, q, group.keys, group.values, mask, **kwargs)
        outputs.append(result)
    return layer.join(outputs), None


@contextmanager
def grouped_attention_for(config: Any) -> Iterator[None]:
    """Run a block with the decoder's attention set to :func:`grouped_attention` (restored after)."""
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = GROUPED
    try:
        yield
    finally:
        config._attn_implementation_internal = previous


AttentionInterface.register(GROUPED, grouped_attention)
