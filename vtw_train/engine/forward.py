"""The replacement ``forward`` of the text decoder.

Only the decoder's own loop is replaced; decoder layers, rotary module, mask builder and
cache are the stock ones (docs/engine.md). The loop keeps at most two
groups of samples: those still reading visual tokens (full stream) and those that have
withdrawn them (text stream, re-padded). A sample moves from the first group to the second
before its exit layer K, so each sample pays for visual tokens only up to its own K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..errors import WithdrawalError
from .cache import FULL, MIXED, TEXT, ExitState, WithdrawalCache
from .frozen import frozen_layer_forward
from .layout import TextLayout, build_text_layout

if TYPE_CHECKING:
    from .families import FamilyAdapter
    from .reduction import Reduction


class Steering(Protocol):
    """What the decoder loop needs from whoever steers it (the ``ExitController``).

    A protocol rather than an import, so that the controller (which installs this loop) and the
    loop do not import each other.
    """

    adapter: FamilyAdapter
    num_layers: int
    reduction: Reduction

    def take_visual_mask(self) -> torch.Tensor | None:
        """The visual positions of the prompt entering the decoder now (read once)."""
        ...

    def resolve_exit_layers(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """The reduction's fixed K per sample (None: no fixed exit)."""
        ...

    def record_exits(self, exits: torch.Tensor | None) -> None:
        """Remember where each sample of the last prefill exited."""
        ...


_UNSUPPORTED_OUTPUTS = ("output_attentions", "output_hidden_states")


class _CaptureKV:
    """Stands in for the cache while one group runs a layer, so its keys/values can be merged.

    At a layer where some samples are full and some are text-only, the two groups run
    separately; their keys and values are captured here and written to the real cache in
    one full-layout tensor per layer afterwards.
    """

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys, self.values = key_states, value_states
        return key_states, value_states


@dataclass
class _Group:
    """Samples that share a stream at the current layer, in ascending row order."""

    rows: torch.Tensor  # [n] long
    hidden: torch.Tensor  # [n, T or T_text, D]

    def __len__(self) -> int:
        return int(self.rows.numel())


def _expand_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    return tensor.expand(batch, *tensor.shape[1:]) if tensor.shape[0] == 1 else tensor


def _scatter_kv(text_kv: torch.Tensor, layout: TextLayout, rows: torch.Tensor) -> torch.Tensor:
    """Place text-layout keys/values ``[n, H, T_text, d]`` at their full-stream slots (zeros elsewhere)."""
    n, heads, width, dim = text_kv.shape
    t = layout.full_length
    index, valid = layout.rows_index(rows, width)
    index = torch.where(valid, index, t)
    index = index.view(n, 1, -1, 1).expand(n, heads, -1, dim)
    buffer = text_kv.new_zeros((n, heads, t + 1, dim))
    return buffer.scatter(2, index, text_kv)[:, :, :t]


@dataclass
class _Prefill:
    """What every layer of one prefill needs, fixed for the call (the reduced layout may be reset once, by FastV)."""

    batch: int
    visual: torch.Tensor
    padding: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    full_mask: Any
    full_positions: torch.Tensor | None
    use_cache: bool
    kwargs: dict[str, Any]
    frozen: frozenset[int]
    dropped: torch.Tensor | None = None
    layout: TextLayout | None = None
    text_cos: torch.Tensor | None = None
    text_sin: torch.Tensor | None = None
    text_masks: _TextMasks | None = None

    def set_dropped(self, owner: WithdrawalForward, dropped: torch.Tensor, like: torch.Tensor) -> None:
        """The tokens the reduced stream leaves out: every visual token (VTW) or FastV's pruned ones."""
        self.dropped = dropped
        self.layout = build_text_layout(dropped, self.padding)
        self.text_cos, self.text_sin = self.layout.gather(self.cos), self.layout.gather(self.sin)
        self.text_masks = _TextMasks(owner, self.layout, like)


class _TextMasks:
    """Causal masks of the text stream, one per (rows, width) actually used in this prefill."""

    def __init__(self, owner: WithdrawalForward, layout: TextLayout, like: torch.Tensor) -> None:
        self.owner, self.layout, self.like = owner, layout, like
        self._last: tuple = (None, -1, None)

    def for_rows(self, rows: torch.Tensor, width: int):
        # The group's row tensor is the same object until samples move, so identity is the key:
        # no per-layer rows.tolist() (a device sync on GPU).
        last_rows, last_width, mask = self._last
        if rows is not last_rows or width != last_width:
            _, valid = self.layout.rows_index(rows, width)
            like = self.like.new_empty((len(rows), width, 0))
            # No cache here: at prefill every layer's cache is empty, so the 2-D mask alone sizes it.
            mask = self.owner._mask(like, valid.long(), None, None, 0)
            self._last = (rows, width, mask)
        return mask


class WithdrawalForward:
    """Callable installed as ``language_model.forward``; delegates to the stock forward when nothing is withdrawn."""

    def __init__(self, controller: Steering, language_model: torch.nn.Module, original: Callable) -> None:
        self.controller = controller
        self.lm = language_model
        self.original = original

    # ------------------------------------------------------------------ entry
    def __call__(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        call = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        visual = self.controller.take_visual_mask()
        if isinstance(past_key_values, WithdrawalCache) and past_key_values.exit_state is not None:
            return self._decode(**call)
        prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        if not prefill or visual is None or not bool(visual.any()):
            return self.original(**call)
        controller = self.controller
        reduction = controller.reduction
        exits = controller.resolve_exit_layers(visual.shape[0], visual.device)
        pruning = reduction.pruning
        if pruning is not None:
            exits = torch.full((visual.shape[0],), pruning.layer, dtype=torch.long, device=visual.device)
        reduces = exits is not None and (
            reduction.exit_rule is not None or bool((exits < controller.num_layers).any())
        )
        if not reduces and not reduction.frozen_layers:
            # Nothing is withdrawn (K = L for everyone): the stock forward, but each sample's K is on record.
            controller.record_exits(None if pruning is not None else exits)
            return self.original(**call)
        if exits is None:
            exits = torch.full(
                (visual.shape[0],), controller.num_layers, dtype=torch.long, device=visual.device
            )
        return self._prefill(visual=visual, exits=exits, reduction=reduction, **call)

    # ------------------------------------------------------------------ shared helpers
    def _check_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        for name in _UNSUPPORTED_OUTPUTS:
            if kwargs.pop(name, None):
                raise WithdrawalError(
                    f"{name}=True is not supported while visual tokens are withdrawn (layers after the exit see "
                    "fewer tokens). Set controller.exit_layer = None, or run that call under controller.using()."
                )
        kwargs.pop("return_dict", None)
        return kwargs

    def _resolve_use_cache(self, use_cache: bool | None) -> bool:
        if use_cache is None:
            use_cache = bool(getattr(self.lm.config, "use_cache", True))
        if self.lm.gradient_checkpointing and self.lm.training:
            use_cache = False
        return use_cache

    def _check_layer_types(self) -> None:
        layer_types = getattr(self.lm.config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise WithdrawalError(
                "Visual-token withdrawal supports full-attention decoders only; this config has layer_types "
                f"{sorted(set(layer_types))}. Disable sliding-window attention (use_sliding_window=False)."
            )

    def _rotary(
        self, hidden: torch.Tensor, rope: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.lm.rotary_emb(hidden, rope)
        return _expand_batch(cos, batch), _expand_batch(sin, batch)

    def _mask(self, hidden_like: torch.Tensor, padding: torch.Tensor | None, cache, positions, layer: int):
        return create_causal_mask(
            config=self.lm.config,
            inputs_embeds=hidden_like,
            attention_mask=padding,
            past_key_values=cache,
            position_ids=positions,
            layer_idx=layer,
        )

    def _run_layer(self, layer_idx, hidden, mask, cos, sin, positions, cache, use_cache, kwargs):
        return self.lm.layers[layer_idx](
            hidden,
            attention_mask=mask,
            position_embeddings=(cos, sin),
            position_ids=positions,
            past_key_values=cache,
            use_cache=use_cache,
            **kwargs,
        )

    # ------------------------------------------------------------------ prefill
    def _prefill(
        self,
        *,
        visual: torch.Tensor,
        exits: torch.Tensor,
        reduction: Reduction,
        input_ids,
        attention_mask,
        position_ids,
        past_key_values,
        inputs_embeds,
        use_cache,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        self._check_layer_types()
        kwargs = self._check_kwargs(kwargs)
        if attention_mask is not None and (
            not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2
        ):
            raise WithdrawalError(
                "Visual-token withdrawal needs a 2-D padding mask (batch, sequence) or none; a prepared 4-D or "
                "per-layer mask cannot be re-sized for the text-only layers."
            )
        if inputs_embeds is None:
            inputs_embeds = self.lm.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if visual.shape != (batch, length):
            raise WithdrawalError(
                f"Visual mask shape {tuple(visual.shape)} does not match the decoder input {(batch, length)}."
            )
        controller = self.controller
        use_cache = self._resolve_use_cache(use_cache)
        cache = None
        if use_cache:
            cache = WithdrawalCache.promote(past_key_values) if past_key_values is not None else None
            if cache is None:
                cache = WithdrawalCache(config=self.lm.config)

        adapter = controller.adapter
        if position_ids is None:
            positions = adapter.default_positions(0, length, batch, inputs_embeds.device)
        else:
            positions = adapter.split_positions(position_ids)
        cos, sin = self._rotary(inputs_embeds, positions.rope, batch)
        ctx = _Prefill(
            batch=batch,
            visual=visual,
            padding=attention_mask,
            cos=cos,
            sin=sin,
            full_mask=self._mask(inputs_embeds, attention_mask, cache, positions.text, 0),
            full_positions=None if positions.text is None else _expand_batch(positions.text, batch),
            use_cache=use_cache,
            kwargs=kwargs,
            frozen=reduction.frozen_layers,
        )
        ctx.set_dropped(self, visual, inputs_embeds)

        exits = exits.clone()
        everyone = torch.arange(batch, device=inputs_embeds.device)
        starts_full = exits > 0
        full = _Group(everyone[starts_full], inputs_embeds[starts_full])
        text_rows = everyone[~starts_full]
        text = _Group(
            text_rows, ctx.layout.gather(inputs_embeds[~starts_full], text_rows, ctx.layout.width(text_rows))
        )
        dynamic = reduction.exit_rule
        fastv = reduction.pruning
        previous_input = None

        for layer_idx in range(controller.num_layers):
            if fastv is not None and layer_idx == fastv.layer:
                # Every row moves now; FastV's chosen visual tokens stay in the reduced stream.
                keep = fastv.select(
                    self.lm.layers[layer_idx - 1], previous_input, cos, sin, visual, attention_mask
                )
                ctx.set_dropped(self, visual & ~keep, inputs_embeds)
            if fastv is not None and layer_idx == fastv.layer - 1:
                previous_input = full.hidden
            if dynamic is not None and layer_idx > 0 and len(full):
                fire = dynamic(layer_idx - 1, full.hidden, full.rows, visual, attention_mask)
                if fire is not None:
                    exits[full.rows[fire]] = torch.minimum(
                        exits[full.rows[fire]], exits.new_tensor(layer_idx)
                    )
            moving = exits[full.rows] <= layer_idx
            if bool(moving.any()):
                full, text = self._move(full, text, moving, ctx.layout)

            if not len(text) or not len(full):
                group, is_full = (full, True) if len(full) else (text, False)
                group.hidden = self._run_group(layer_idx, group, is_full, ctx, cache)
                continue
            captures = (_CaptureKV(), _CaptureKV()) if cache is not None else (None, None)
            full.hidden = self._run_group(layer_idx, full, True, ctx, captures[0])
            text.hidden = self._run_group(layer_idx, text, False, ctx, captures[1])
            if cache is not None:
                self._store_mixed(cache, layer_idx, captures, full, text, ctx.layout, batch)

        hidden = inputs_embeds.new_zeros(inputs_embeds.shape)
        if len(full):
            hidden = hidden.index_copy(0, full.rows, full.hidden)
        if len(text):
            hidden = ctx.layout.scatter(text.hidden, hidden, text.rows)
        hidden = self.lm.norm(hidden)

        controller.record_exits(None if fastv is not None else exits)  # FastV prunes, it does not exit
        if cache is not None:
            padding = (
                attention_mask.long()
                if attention_mask is not None
                else visual.new_ones(visual.shape, dtype=torch.long)
            )
            cache.exit_state = ExitState(
                exit_layers=exits,
                visual=ctx.dropped,
                full_mask=padding,
                text_mask=ctx.layout.valid.long(),
                num_layers=controller.num_layers,
            )
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)

    def _move(
        self, full: _Group, text: _Group, moving: torch.Tensor, layout: TextLayout
    ) -> tuple[_Group, _Group]:
        """Withdraw the visual tokens of the ``moving`` rows of the full group."""
        rows = full.rows[moving]
        joined_rows = torch.cat([text.rows, rows])
        width = layout.width(joined_rows)
        staying = text.hidden
        if staying.shape[1] < width:  # newcomers have longer text: re-pad the group on the left
            staying = torch.nn.functional.pad(staying, (0, 0, width - staying.shape[1], 0))
        joined = torch.cat([staying, layout.gather(full.hidden[moving], rows, width)])
        order = torch.argsort(joined_rows)
        return _Group(full.rows[~moving], full.hidden[~moving]), _Group(joined_rows[order], joined[order])

    def _run_group(self, layer_idx: int, group: _Group, is_full: bool, ctx: _Prefill, cache) -> torch.Tensor:
        rows = group.rows
        whole = len(rows) == ctx.batch
        if is_full and layer_idx in ctx.frozen:
            padding = None if ctx.padding is None else ctx.padding[rows]
            return frozen_layer_forward(
                self.lm.layers[layer_idx],
                layer_idx,
                group.hidden,
                ctx.visual[rows],
                padding,
                ctx.cos[rows],
                ctx.sin[rows],
                self.lm.config,
                cache,
                ctx.kwargs,
            )
        if is_full:
            mask = ctx.full_mask if whole or ctx.full_mask is None else ctx.full_mask[rows]
            c, s = (ctx.cos, ctx.sin) if whole else (ctx.cos[rows], ctx.sin[rows])
            pos = ctx.full_positions if whole or ctx.full_positions is None else ctx.full_positions[rows]
        else:
            width = group.hidden.shape[1]
            mask = ctx.text_masks.for_rows(rows, width)
            start = ctx.text_cos.shape[1] - width
            c, s = (
                (ctx.text_cos, ctx.text_sin)
                if whole
                else (ctx.text_cos[rows, start:], ctx.text_sin[rows, start:])
            )
            pos = None  # gathered positions have gaps; flash-attention would read them as packed sequences
        return self._run_layer(layer_idx, group.hidden, mask, c, s, pos, cache, ctx.use_cache, ctx.kwargs)

    @staticmethod
    def _store_mixed(
        cache, layer_idx, captures, full: _Group, text: _Group, layout: TextLayout, batch: int
    ) -> None:
        """Write one full-layout key/value tensor for a layer where the two groups ran apart."""
        tensors = []
        for attr in ("keys", "values"):
            full_kv = getattr(captures[0], attr)
            text_kv = _scatter_kv(getattr(captures[1], attr), layout, text.rows)
            merged = full_kv.new_zeros((batch, *full_kv.shape[1:]))
            merged = merged.index_copy(0, full.rows, full_kv).index_copy(0, text.rows, text_kv)
            tensors.append(merged)
        cache.update(tensors[0], tensors[1], layer_idx)

    # ------------------------------------------------------------------ decode
    def _decode(
        self,
        *,
        input_ids,
        attention_mask,
        position_ids,
        past_key_values: WithdrawalCache,
        inputs_embeds,
        use_cache,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        kwargs = self._check_kwargs(kwargs)
        cache = past_key_values
        state = cache.exit_state
        if inputs_embeds is None:
            inputs_embeds = self.lm.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if batch != state.exit_layers.shape[0]:
            raise WithdrawalError(
                f"Batch size {batch} does not match the withdrawn cache's {state.exit_layers.shape[0]} rows."
            )
        start = cache.get_seq_length()
        if (
            attention_mask is not None
            and isinstance(attention_mask, torch.Tensor)
            and attention_mask.dim() == 2
        ):
            if attention_mask.shape[1] != start + length:
                raise WithdrawalError(
                    f"attention_mask covers {attention_mask.shape[1]} tokens but the cache holds {start} and "
                    f"{length} are new; pass the mask of the whole sequence."
                )
            new_columns = attention_mask[:, -length:]
        elif attention_mask is None:
            new_columns = state.full_mask.new_ones((batch, length))
        else:
            raise WithdrawalError("Decoding after withdrawal needs a 2-D padding mask or none.")
        state.append(new_columns)

        adapter = self.controller.adapter
        if position_ids is None:
            positions = adapter.default_positions(start, length, batch, inputs_embeds.device)
        else:
            positions = adapter.split_positions(position_ids)
        cos, sin = self._rotary(inputs_embeds, positions.rope, batch)

        masks: dict[Any, Any] = {}
        layouts = state.layouts()
        for layer_idx, kind in enumerate(layouts):
            key = kind if kind != MIXED else (MIXED, layer_idx)
            if key in masks:
                continue
            if kind == FULL:
                masks[key] = self._mask(inputs_embeds, state.full_mask, cache, positions.text, layer_idx)
            elif kind == TEXT:
                masks[key] = self._mask(inputs_embeds, state.text_mask, cache, None, layer_idx)
            else:
                masks[key] = self._mask(inputs_embeds, state.mixed_mask(layer_idx), cache, None, layer_idx)

        hidden = inputs_embeds
        use_cache = True if use_cache is None else use_cache
        for layer_idx, kind in enumerate(layouts):
            key = kind if kind != MIXED else (MIXED, layer_idx)
            pos = positions.text if kind == FULL else None
            hidden = self._run_layer(layer_idx, hidden, masks[key], cos, sin, pos, cache, use_cache, kwargs)
        hidden = self.lm.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)
