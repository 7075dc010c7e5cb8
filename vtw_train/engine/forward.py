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
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, create_causal_mask
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
    """Samples that share a stream at the current layer.

    ``rows`` (host list) and ``index`` (the same rows on the device) name them; the engine decides
    which samples move from host-side knowledge only, so no per-layer device read is needed.
    """

    rows: list[int]
    index: torch.Tensor  # [n] long, on the device
    hidden: torch.Tensor  # [n, T or width, D]

    def __len__(self) -> int:
        return len(self.rows)


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


def _device_index(values: list[int], device: torch.device) -> torch.Tensor:
    """A small host list as a device index, copied without draining the device's queue."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class _Plan:
    """What one prefill knows on the host, read from the device once (one host sync for the whole call).

    ``n_text[b]``: real non-visual tokens of row b; ``n_visual[b]``: its visual tokens;
    ``exits[b]``: its exit layer K (``num_layers``: never).
    """

    n_text: list[int]
    n_visual: list[int]
    exits: list[int]

    @classmethod
    def read(cls, visual: torch.Tensor, padding: torch.Tensor | None, exits: torch.Tensor | int) -> _Plan:
        real = visual.new_ones(visual.shape) if padding is None else padding.bool()
        batch = visual.shape[0]
        columns = [(~visual & real).sum(1), (visual & real).sum(1)]
        if isinstance(exits, torch.Tensor):
            columns.append(exits.to(visual.device))
        n_text, n_visual, *rest = torch.stack(columns).tolist()  # the one host sync
        return cls(n_text, n_visual, rest[0] if rest else [int(exits)] * batch)

    def width(self, rows: list[int], kept: list[int] | None = None) -> int:
        """Text slots the rows need (their longest text, plus kept visual tokens after FastV)."""
        extra = kept or [0] * len(self.n_text)
        return max((self.n_text[r] + extra[r] for r in rows), default=0)


class _LaggedDecisions:
    """Exit decisions read ``lag`` layers after they were made, so reading them never drains the device.

    A decision made after layer l applies from layer l + 1 + lag. With ``lag`` 0 it is read at
    once (a host sync per asked layer); with ``lag`` >= 1 the device has the next layers queued
    when the host waits for it, so the launch pipeline keeps running.
    """

    def __init__(self, lag: int) -> None:
        self.lag = lag
        self._pending: list[tuple[int, list[int], Any, Any]] = []

    def add(self, layer: int, rows: list[int], fire: torch.Tensor) -> None:
        host, event = fire, None
        if fire.device.type == "cuda":
            host = torch.empty(fire.shape, dtype=fire.dtype, pin_memory=True)
            host.copy_(fire, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending.append((layer, rows, host, event))

    def due(self, layer_idx: int) -> list[int]:
        """Rows whose decision applies from ``layer_idx`` on (decisions made at layer_idx - 1 - lag or before)."""
        fired: list[int] = []
        keep = []
        for item in self._pending:
            made, rows, host, event = item
            if made + 1 + self.lag > layer_idx:
                keep.append(item)
                continue
            if self.lag == 0:  # read at once: the host waits for the whole queue (a drain on a GPU)
                values = host.tolist()
            else:
                if event is not None:
                    event.synchronize()  # the device has the next layers queued: no drain
                values = _read(host)
            fired += [row for row, f in zip(rows, values, strict=True) if f]
        self._pending = keep
        return fired


def _read(host: torch.Tensor) -> list[bool]:
    """A host-side (or CPU) tensor's values; the only place the engine reads decisions."""
    return host.tolist()


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
    plan: _Plan
    visual_layout: TextLayout | None = None
    dropped: torch.Tensor | None = None
    kept: list[int] | None = None
    layout: TextLayout | None = None
    text_cos: torch.Tensor | None = None
    text_sin: torch.Tensor | None = None
    text_masks: _TextMasks | None = None

    def set_dropped(
        self,
        owner: WithdrawalForward,
        dropped: torch.Tensor,
        like: torch.Tensor,
        kept: list[int] | None = None,
    ) -> None:
        """The tokens the reduced stream leaves out: every visual token (VTW) or FastV's pruned ones.

        ``kept[b]``: visual tokens row b keeps in the reduced stream (FastV), so its width is known.
        """
        self.dropped = dropped
        self.kept = kept
        width = self.plan.width(list(range(self.batch)), kept)
        self.layout = build_text_layout(dropped, self.padding, text_length=width)
        if kept is None:
            self.visual_layout = self.layout
        self.text_cos, self.text_sin = self.layout.gather(self.cos), self.layout.gather(self.sin)
        self.text_masks = _TextMasks(owner, self.layout, like)


class _TextMasks:
    """Causal masks of the text stream, one per (rows, width) actually used in this prefill."""

    def __init__(self, owner: WithdrawalForward, layout: TextLayout, like: torch.Tensor) -> None:
        self.owner, self.layout, self.like = owner, layout, like
        self._last: tuple = (None, -1, None)

    def for_rows(self, rows: torch.Tensor, width: int, padded: bool):
        """The mask of the group ``rows`` at ``width``; ``padded`` (known on the host) says whether any of
        its rows is shorter than ``width``. Transformers' mask builder would read that from the device."""
        # The group's row tensor is the same object until samples move, so identity is the key.
        last_rows, last_width, mask = self._last
        if rows is not last_rows or width != last_width:
            like = self.like.new_empty((len(rows), width, 0))
            if padded:
                _, valid = self.layout.rows_index(rows, width)
                mask = self.owner._padded_mask(like, valid)
            else:  # no padding: plain causal (no mask for SDPA), as the stock builder would decide
                mask = self.owner._mask(like, None, None, None, 0)
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
        controller = self.controller
        reduction = controller.reduction
        if not prefill or visual is None or reduction.is_full:
            if prefill and visual is not None:
                controller.record_exits(None)
            return self.original(**call)
        batch = visual.shape[0]
        pruning = reduction.pruning
        if pruning is not None:
            exits: torch.Tensor | int = pruning.layer
        elif isinstance(reduction.exit_layer, torch.Tensor):
            exits = controller.resolve_exit_layers(batch, visual.device)
        else:
            exits = controller.num_layers if reduction.exit_layer is None else reduction.exit_layer
        plan = _Plan.read(visual, attention_mask if isinstance(attention_mask, torch.Tensor) else None, exits)
        recorded = (
            None if pruning is not None else torch.tensor(plan.exits).to(visual.device, non_blocking=True)
        )
        reduces = reduction.exit_rule is not None or reduction.frozen_layers or pruning is not None
        reduces = reduces or any(k < controller.num_layers for k in plan.exits)
        if not any(plan.n_visual) or not reduces:
            # Nothing is withdrawn (no visual token, or K = L for everyone): the stock forward, each K on record.
            controller.record_exits(recorded if any(plan.n_visual) else None)
            return self.original(**call)
        return self._prefill(visual=visual, plan=plan, reduction=reduction, **call)

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

    def _padded_mask(self, like: torch.Tensor, valid: torch.Tensor):
        """Causal mask over a left-padded group, built without the builder's device-reading shortcuts."""
        implementation = self.lm.config._attn_implementation
        if implementation not in ALL_MASK_ATTENTION_FUNCTIONS:
            return self._mask(like, valid.long(), None, None, 0)
        batch, width = like.shape[:2]
        return ALL_MASK_ATTENTION_FUNCTIONS[implementation](
            batch_size=batch,
            q_length=width,
            kv_length=width,
            q_offset=0,
            kv_offset=0,
            mask_function=causal_mask_function,
            attention_mask=valid,
            allow_is_causal_skip=False,
            dtype=like.dtype,
            device=like.device,
            config=self.lm.config,
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
        plan: _Plan,
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
        device = inputs_embeds.device
        if visual.shape != (batch, length):
            raise WithdrawalError(
                f"Visual mask shape {tuple(visual.shape)} does not match the decoder input {(batch, length)}."
            )
        controller = self.controller
        num_layers = controller.num_layers
        use_cache = self._resolve_use_cache(use_cache)
        cache = None
        if use_cache:
            cache = WithdrawalCache.promote(past_key_values) if past_key_values is not None else None
            if cache is None:
                cache = WithdrawalCache(config=self.lm.config)

        adapter = controller.adapter
        if position_ids is None:
            positions = adapter.default_positions(0, length, batch, device)
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
            plan=plan,
        )
        ctx.set_dropped(self, visual, inputs_embeds)

        exits = list(plan.exits)
        # Rows are grouped on the host: the full group (still reading visual tokens) and the text
        # group (withdrawn). Samples move from the first to the second before their exit layer.
        everyone = list(range(batch))
        full_rows = [r for r in everyone if exits[r] > 0]
        text_rows = [r for r in everyone if exits[r] <= 0]
        full = _Group(full_rows, self._index(full_rows, batch, device), inputs_embeds)
        if text_rows:
            full.hidden = inputs_embeds.index_select(0, full.index)
            index = self._index(text_rows, batch, device)
            width = plan.width(text_rows)
            text = _Group(
                text_rows, index, ctx.layout.gather(inputs_embeds.index_select(0, index), index, width)
            )
        else:
            text = _Group([], torch.empty(0, dtype=torch.long, device=device), inputs_embeds[:0])
        dynamic = reduction.exit_rule
        decisions = _LaggedDecisions(int(getattr(dynamic, "lag", 0))) if dynamic is not None else None
        fastv = reduction.pruning
        previous_input = None

        for layer_idx in range(num_layers):
            if fastv is not None and layer_idx == fastv.layer:
                # Every row moves now; FastV's chosen visual tokens stay in the reduced stream.
                keep = fastv.select(
                    self.lm.layers[layer_idx - 1],
                    previous_input,
                    cos,
                    sin,
                    visual,
                    attention_mask,
                    plan.n_visual,
                )
                kept = [fastv.kept_count(n) for n in plan.n_visual]
                ctx.set_dropped(self, visual & ~keep, inputs_embeds, kept)
            if fastv is not None and layer_idx == fastv.layer - 1:
                previous_input = full.hidden
            if decisions is not None and layer_idx > 0 and len(full):
                fire = dynamic(layer_idx - 1, full.hidden, full.index, visual, attention_mask)
                if fire is not None:
                    decisions.add(layer_idx - 1, full.rows, fire)
            if decisions is not None:
                for row in decisions.due(layer_idx):
                    exits[row] = min(exits[row], layer_idx)
            moving = [r for r in full.rows if exits[r] <= layer_idx]
            if moving:
                full, text = self._move(full, text, moving, ctx)

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
            hidden = hidden.index_copy(0, full.index, full.hidden)
        if len(text):
            hidden = ctx.layout.scatter(text.hidden, hidden, text.index)
        hidden = self.lm.norm(hidden)

        exit_tensor = torch.tensor(exits).to(device, non_blocking=True)
        controller.record_exits(None if fastv is not None else exit_tensor)  # FastV prunes, it does not exit
        if cache is not None:
            padding = (
                attention_mask.long()
                if attention_mask is not None
                else visual.new_ones(visual.shape, dtype=torch.long)
            )
            cache.exit_state = ExitState(
                exit_layers=exit_tensor,
                visual=ctx.dropped,
                full_mask=padding,
                text_mask=ctx.layout.valid.long(),
                num_layers=num_layers,
                host_exits=exits,
            )
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)

    @staticmethod
    def _index(rows: list[int], batch: int, device: torch.device) -> torch.Tensor:
        if rows == list(range(batch)):
            return torch.arange(batch, device=device)
        return _device_index(rows, device)

    def _move(self, full: _Group, text: _Group, moving: list[int], ctx: _Prefill) -> tuple[_Group, _Group]:
        """Withdraw the visual tokens of the ``moving`` rows of the full group (decided on the host)."""
        device = full.hidden.device
        moving_set = set(moving)
        stay_pos = [i for i, r in enumerate(full.rows) if r not in moving_set]
        move_pos = [i for i, r in enumerate(full.rows) if r in moving_set]
        staying_rows = [full.rows[i] for i in stay_pos]
        moved_rows = [full.rows[i] for i in move_pos]
        moved_index = full.index.index_select(0, _device_index(move_pos, device))
        joined_rows = moved_rows + text.rows
        width = ctx.plan.width(joined_rows, ctx.kept)
        arriving = ctx.layout.gather(
            full.hidden.index_select(0, _device_index(move_pos, device)), moved_index, width
        )
        staying = text.hidden
        if staying.shape[1] < width:  # newcomers have longer text: re-pad the group on the left
            staying = torch.nn.functional.pad(staying, (0, 0, width - staying.shape[1], 0))
        joined = torch.cat([arriving, staying]) if len(text) else arriving
        joined_index = torch.cat([moved_index, text.index]) if len(text) else moved_index
        # Keep the group in batch order: a layer that only this group runs writes its keys and values
        # straight to the cache, whose rows are the batch's.
        order = sorted(range(len(joined_rows)), key=joined_rows.__getitem__)
        if order != list(range(len(joined_rows))):
            perm = _device_index(order, device)
            joined, joined_index = joined.index_select(0, perm), joined_index.index_select(0, perm)
            joined_rows = [joined_rows[i] for i in order]
        if stay_pos:
            stay = _device_index(stay_pos, device)
            new_full = _Group(
                staying_rows, full.index.index_select(0, stay), full.hidden.index_select(0, stay)
            )
        else:
            new_full = _Group([], full.index[:0], full.hidden[:0])
        return new_full, _Group(joined_rows, joined_index, joined)

    def _run_group(self, layer_idx: int, group: _Group, is_full: bool, ctx: _Prefill, cache) -> torch.Tensor:
        rows = group.index
        whole = len(group) == ctx.batch and group.rows == list(range(ctx.batch))
        if is_full and layer_idx in ctx.frozen:
            padding = None if ctx.padding is None else ctx.padding[rows]
            layout = ctx.visual_layout.select(rows, ctx.plan.width(group.rows))
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
                layout=layout,
            )
        if is_full:
            mask = ctx.full_mask if whole or ctx.full_mask is None else ctx.full_mask[rows]
            c, s = (ctx.cos, ctx.sin) if whole else (ctx.cos[rows], ctx.sin[rows])
            pos = ctx.full_positions if whole or ctx.full_positions is None else ctx.full_positions[rows]
        else:
            width = group.hidden.shape[1]
            extra = ctx.kept or [0] * ctx.batch
            padded = any(ctx.plan.n_text[r] + extra[r] < width for r in group.rows)
            mask = ctx.text_masks.for_rows(rows, width, padded)
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
            text_kv = _scatter_kv(getattr(captures[1], attr), layout, text.index)
            merged = full_kv.new_zeros((batch, *full_kv.shape[1:]))
            merged = merged.index_copy(0, full.index, full_kv).index_copy(0, text.index, text_kv)
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
