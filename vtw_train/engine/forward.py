"""The replacement ``forward`` of the text decoder.

Only the decoder's own loop is replaced; decoder layers, rotary module, mask builder and
cache are the stock ones (docs/engine.md). The loop keeps at most two
groups of samples: those still reading visual tokens (full stream) and those that have
withdrawn them (text stream, re-padded). A sample moves from the first group to the second
before its exit layer K, so each sample pays for visual tokens only up to its own K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..errors import WithdrawalError
from .cache import FULL, MIXED, REDUCED, TEXT, ExitState, WithdrawalCache
from .frozen import FrozenPlan, frozen_layer_forward, frozen_plan
from .graphs import SegmentGraphs, kwargs_are_constants
from .grouped import GroupedLayer, KVGroup, device_index, group_masks, grouped_attention_for
from .layout import TextLayout, build_text_layout
from .reduction import StagedExitRule

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

    @property
    def graphs(self) -> SegmentGraphs | None:
        """The graph recorder when graph-captured prefill is on (None: off)."""
        ...


_UNSUPPORTED_OUTPUTS = ("output_attentions", "output_hidden_states")


class _CaptureKV:
    """Stands in for the cache while one group runs a layer, so its keys and values can be kept per group.

    At a layer where some samples are full and some are text-only, the two groups run
    separately; their keys and values are captured here and become one :class:`GroupedLayer`
    of the real cache afterwards, each group in its own layout.
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


_device_index = device_index


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
            # On the copy's stream: fire's device, which need not be the current one.
            event.record(torch.cuda.current_stream(fire.device))
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
            # The copy to pinned memory is asynchronous: wait for it (the event) before reading, always.
            if event is not None:
                event.synchronize()
            if self.lag == 0:  # read at once: nothing else is queued, so the wait drains the device
                values = host.tolist()
            else:  # the device has the next layers queued: the wait is for the copy only
                values = _read(host)
            fired += [row for row, f in zip(rows, values, strict=True) if f]
        self._pending = keep
        return fired


def _segment_ends(plan: _Plan, num_layers: int, fastv, rule, decisions: _LaggedDecisions | None) -> set[int]:
    """Layers before which a group of rows may change, so a graph segment must end: each exit layer, FastV's
    layer and the one before it (whose input FastV ranks from), and for an exit rule each layer after
    one it is asked at (it reads that output) and each layer where one of its decisions lands."""
    ends = {k for k in plan.exits if 0 < k < num_layers}
    if fastv is not None:
        ends |= {fastv.layer - 1, fastv.layer}
    if decisions is not None:
        asked = [a for a in range(num_layers) if _may_ask(rule, a)]
        ends |= {a + step for a in asked for step in (1, 1 + decisions.lag) if a + step < num_layers}
    return ends


#: Segment inputs after the hidden states (mask, rotary tables, positions, the frozen layers' plan, the rule's
#: prepared tensors): the same tensors for many segments of one prefill, so graphs share their buffers.
_CONTEXT_INPUTS = frozenset(range(1, 11))


def _may_ask(rule: Any, layer: int) -> bool:
    """Whether ``rule`` may fire after ``layer`` (a rule without ``asked_layers`` is asked after every layer)."""
    asked = getattr(rule, "asked_layers", None)
    return asked is None or layer in asked


def _put_layer(cache: Any, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make a segment's keys and values the prefill cache of ``layer_idx`` (no copy: they are fresh tensors)."""
    if cache is None:
        return
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())
    layer = cache.layers[layer_idx]
    if isinstance(layer, GroupedLayer) or (layer.is_initialized and layer.keys.numel()):
        raise WithdrawalError(f"Layer {layer_idx} of the cache is not empty at prefill; pass an empty cache.")
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values


def _read(host: torch.Tensor) -> list[bool]:
    """A host-side (or CPU) tensor's values; the only place the engine reads decisions."""
    return host.tolist()


@dataclass
class _Asked:
    """A decision an exit rule took inside a recorded segment, after its last layer; the loop hands it to
    the lagged reader at the next cut, where it would otherwise have asked the rule."""

    layer: int
    rows: list[int]
    probability: torch.Tensor
    fire: torch.Tensor


@dataclass
class _Prefill:
    """What every layer of one prefill needs, fixed for the call."""

    batch: int
    visual: torch.Tensor
    padding: torch.Tensor | None
    like: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    full_mask: Any
    full_positions: torch.Tensor | None
    use_cache: bool
    kwargs: dict[str, Any]
    frozen: frozenset[int]
    plan: _Plan
    text: _Stream | None = None
    frozen_plans: dict[int, tuple[torch.Tensor, FrozenPlan]] = field(default_factory=dict)  # by id(rows)


@dataclass
class _Stream:
    """The prompt without some of its tokens, re-padded on the left: the text stream (every visual token
    left out) or FastV's reduced stream (the visual tokens it pruned left out).

    ``extra[b]``: visual tokens row b keeps in this stream (0 in the text stream), so widths are known
    on the host. ``visual``: ``[B, width]`` bool, the slots an exit rule must read as image (kept visual
    tokens, and text that came before the last one), so it pools the same text as in the full stream.
    """

    name: str
    layout: TextLayout
    cos: torch.Tensor
    sin: torch.Tensor
    masks: _TextMasks
    extra: list[int]
    visual: torch.Tensor | None = None

    @classmethod
    def build(cls, owner: WithdrawalForward, name: str, dropped: torch.Tensor, ctx: _Prefill,
              extra: list[int] | None = None) -> _Stream:  # fmt: skip
        extra = extra or [0] * ctx.batch
        width = max((ctx.plan.n_text[r] + extra[r] for r in range(ctx.batch)), default=0)
        layout = build_text_layout(dropped, ctx.padding, text_length=width)
        visual = None
        if name == REDUCED:
            positions = torch.arange(ctx.visual.shape[1], device=ctx.visual.device)
            last_visual = torch.where(ctx.visual, positions, -1).max(dim=1).values
            image_side = torch.gather(ctx.visual, 1, layout.index) | (layout.index < last_visual.unsqueeze(1))
            visual = image_side & layout.valid
        masks = _TextMasks(owner, layout, ctx.like)
        return cls(name, layout, layout.gather(ctx.cos), layout.gather(ctx.sin), masks, extra, visual)

    def padded(self, plan: _Plan, rows: list[int], width: int) -> bool:
        """Whether any of ``rows`` is shorter than ``width`` in this stream (known on the host)."""
        return any(plan.n_text[r] + self.extra[r] < width for r in rows)

    def width(self, plan: _Plan, rows: list[int]) -> int:
        """Slots the rows need in this stream: their longest text plus the visual tokens they keep here."""
        return max((plan.n_text[r] + self.extra[r] for r in rows), default=0)


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
        if not prefill or visual is None:
            return self.original(**call)
        batch = visual.shape[0]
        graphs = self._graphs_for(batch, visual.device, kwargs, attention_mask, past_key_values)
        if reduction.is_full and graphs is None:
            controller.record_exits(None)
            return self.original(**call)
        pruning = reduction.pruning
        exits: torch.Tensor | int
        if isinstance(reduction.exit_layer, torch.Tensor):
            exits = controller.resolve_exit_layers(batch, visual.device)
        else:
            exits = controller.num_layers if reduction.exit_layer is None else reduction.exit_layer
        plan = _Plan.read(visual, attention_mask if isinstance(attention_mask, torch.Tensor) else None, exits)
        recorded = None
        if pruning is None or reduction.withdraws:  # FastV alone prunes, it does not exit
            recorded = torch.tensor(plan.exits).to(visual.device, non_blocking=True)
        reduces = reduction.exit_rule is not None or reduction.frozen_layers or pruning is not None
        reduces = reduces or any(k < controller.num_layers for k in plan.exits)
        if not any(plan.n_visual) or not reduces:
            # Nothing is withdrawn (no visual token, or K = L for everyone): the stock forward, each K on record;
            # or, with graphs on, the same layers as one recorded segment and a plain cache.
            controller.record_exits(recorded if any(plan.n_visual) and not reduction.is_full else None)
            if graphs is None or not any(plan.n_visual):
                return self.original(**call)
            return self._prefill(
                visual=visual, plan=plan, reduction=reduction, graphs=graphs, stock=True, **call
            )
        return self._prefill(visual=visual, plan=plan, reduction=reduction, graphs=graphs, **call)

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
        graphs: SegmentGraphs | None = None,
        stock: bool = False,
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
            like=inputs_embeds,
            cos=cos,
            sin=sin,
            full_mask=self._mask(inputs_embeds, attention_mask, cache, positions.text, 0),
            full_positions=None if positions.text is None else _expand_batch(positions.text, batch),
            use_cache=use_cache,
            kwargs=kwargs,
            frozen=reduction.frozen_layers,
            plan=plan,
        )
        # Nothing withdrawn (stock): no row ever reaches the text stream, so its layout is not built.
        ctx.text = None if stock else _Stream.build(self, TEXT, visual, ctx)

        exits = list(plan.exits)
        # Rows are grouped on the host: the full group (still reading visual tokens: the full stream,
        # or FastV's reduced stream from its layer on) and the text group (withdrawn). Samples move
        # from the first to the second before their exit layer.
        everyone = list(range(batch))
        full_rows = [r for r in everyone if exits[r] > 0]
        text_rows = [r for r in everyone if exits[r] <= 0]
        full = _Group(full_rows, self._index(full_rows, batch, device), inputs_embeds)
        if text_rows:
            full.hidden = inputs_embeds.index_select(0, full.index)
            index = self._index(text_rows, batch, device)
            width = ctx.text.width(plan, text_rows)
            text = _Group(
                text_rows, index, ctx.text.layout.gather(inputs_embeds.index_select(0, index), index, width)
            )
        else:
            text = _Group([], torch.empty(0, dtype=torch.long, device=device), inputs_embeds[:0])
        reduced: _Stream | None = (
            None  # the full group's stream once FastV has pruned (None: the full stream)
        )
        dynamic = reduction.exit_rule
        decisions = _LaggedDecisions(int(getattr(dynamic, "lag", 0))) if dynamic is not None else None
        fastv = reduction.pruning
        previous_input = None
        streams: list[str] = []  # what each layer's cache holds, for decoding
        ends = _segment_ends(plan, num_layers, fastv, dynamic, decisions) if graphs is not None else set()
        staged = dynamic if isinstance(dynamic, StagedExitRule) else None
        asked: _Asked | None = None
        observed: list[tuple[int, torch.Tensor]] = []  # probabilities of decisions taken inside graphs

        layer_idx = 0
        while layer_idx < num_layers:
            if fastv is not None and layer_idx == fastv.layer and len(full):
                full, reduced = self._prune(full, previous_input, fastv, ctx)
            if asked is not None and asked.layer == layer_idx - 1:  # taken inside the last segment's graph
                decisions.add(asked.layer, asked.rows, asked.fire)
                observed.append((asked.layer, asked.probability))
            elif decisions is not None and layer_idx > 0 and len(full) and _may_ask(dynamic, layer_idx - 1):
                seen = (visual, attention_mask) if reduced is None else (reduced.visual, reduced.layout.valid)
                fire = dynamic(layer_idx - 1, full.hidden, full.index, *seen)
                if fire is not None:
                    decisions.add(layer_idx - 1, full.rows, fire)
            asked = None
            if decisions is not None:
                for row in decisions.due(layer_idx):
                    exits[row] = min(exits[row], layer_idx)
            moving = [r for r in full.rows if exits[r] <= layer_idx]
            if moving:
                full, text = self._move(full, text, moving, reduced, ctx)
            if fastv is not None and layer_idx == fastv.layer - 1:
                previous_input = full.hidden  # FastV ranks with this layer's input, after this layer's moves

            if graphs is not None:
                stop = min((e for e in ends if e > layer_idx), default=num_layers)
                rule = (
                    staged
                    if staged is not None and self._decides_in_graph(staged, stop, fastv, full)
                    else None
                )
                ran, asked = self._run_segment(layer_idx, stop, full, text, reduced, ctx, cache, graphs, rule)
                streams += ran
                layer_idx = stop
                continue
            if not len(text) or not len(full):
                group, stream = (full, reduced) if len(full) else (text, ctx.text)
                group.hidden = self._run_group(layer_idx, group, stream, ctx, cache)
                streams.append(FULL if stream is None else stream.name)
                layer_idx += 1
                continue
            captures = (_CaptureKV(), _CaptureKV()) if cache is not None else (None, None)
            full.hidden = self._run_group(layer_idx, full, reduced, ctx, captures[0])
            text.hidden = self._run_group(layer_idx, text, ctx.text, ctx, captures[1])
            if cache is not None:
                self._store_grouped(cache, layer_idx, captures, full, text, reduced, ctx)
            streams.append(MIXED)
            layer_idx += 1

        if len(full) == batch and reduced is None:  # every row ran in full: already the output's layout
            hidden = full.hidden
        else:
            hidden = self._assemble(inputs_embeds, full, text, reduced, ctx)
        hidden = self.lm.norm(hidden)

        if observed:  # out of the replay buffers in one copy, then handed to the rule
            copied = torch.cat([p for _, p in observed]).split([p.shape[0] for _, p in observed])
            for (layer, _), probability in zip(observed, copied, strict=True):
                dynamic.observe(layer, probability)
        if stock:  # nothing withdrawn (graphs on): a plain cache, decoded by the stock forward
            return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)
        exit_tensor = torch.tensor(exits).to(device, non_blocking=True)
        # FastV alone prunes, it does not exit: no exit layers on record then.
        controller.record_exits(None if fastv is not None and not reduction.withdraws else exit_tensor)
        if cache is not None:
            padding = (
                attention_mask.long()
                if attention_mask is not None
                else visual.new_ones(visual.shape, dtype=torch.long)
            )
            cache.exit_state = ExitState(
                exit_layers=exit_tensor,
                visual=visual,
                full_mask=padding,
                text_mask=ctx.text.layout.valid.long(),
                reduced_mask=None if reduced is None else reduced.layout.valid.long(),
                layer_streams=streams,
            )
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)

    @staticmethod
    def _assemble(
        like: torch.Tensor, full: _Group, text: _Group, reduced: _Stream | None, ctx: _Prefill
    ) -> torch.Tensor:
        """The groups' final states at their full-stream positions (zeros where tokens were withdrawn)."""
        hidden = like.new_zeros(like.shape)
        if len(full):
            if reduced is None:
                hidden = hidden.index_copy(0, full.index, full.hidden)
            else:
                hidden = reduced.layout.scatter(full.hidden, hidden, full.index)
        if len(text):
            hidden = ctx.text.layout.scatter(text.hidden, hidden, text.index)
        return hidden

    @staticmethod
    def _index(rows: list[int], batch: int, device: torch.device) -> torch.Tensor:
        if rows == list(range(batch)):
            return torch.arange(batch, device=device)
        return _device_index(rows, device)

    def _prune(
        self, full: _Group, previous_input: torch.Tensor, fastv, ctx: _Prefill
    ) -> tuple[_Group, _Stream]:
        """FastV at its layer: the full group keeps the visual tokens chosen from the previous layer's input."""
        rows = full.index
        padding = None if ctx.padding is None else ctx.padding.index_select(0, rows)
        chosen = fastv.select(
            self.lm.layers[fastv.layer - 1],
            previous_input,
            ctx.cos.index_select(0, rows),
            ctx.sin.index_select(0, rows),
            ctx.visual.index_select(0, rows),
            padding,
            [ctx.plan.n_visual[r] for r in full.rows],
        )
        keep = torch.zeros_like(ctx.visual).index_copy(0, rows, chosen)
        extra = [0] * ctx.batch
        for r in full.rows:
            extra[r] = fastv.kept_count(ctx.plan.n_visual[r])
        reduced = _Stream.build(self, REDUCED, ctx.visual & ~keep, ctx, extra)
        # The full group always spans the reduced stream's whole width, so the exit rule's view of it
        # (reduced.visual, reduced.layout.valid) lines up with its rows.
        hidden = reduced.layout.gather(full.hidden, rows, reduced.layout.length)
        return _Group(full.rows, rows, hidden), reduced

    def _move(
        self, full: _Group, text: _Group, moving: list[int], reduced: _Stream | None, ctx: _Prefill
    ) -> tuple[_Group, _Group]:
        """Withdraw the visual tokens of the ``moving`` rows of the full group (decided on the host)."""
        device = full.hidden.device
        moving_set = set(moving)
        stay_pos = [i for i, r in enumerate(full.rows) if r not in moving_set]
        move_pos = [i for i, r in enumerate(full.rows) if r in moving_set]
        staying_rows = [full.rows[i] for i in stay_pos]
        moved_rows = [full.rows[i] for i in move_pos]
        moved_index = full.index.index_select(0, _device_index(move_pos, device))
        joined_rows = moved_rows + text.rows
        width = ctx.text.width(ctx.plan, joined_rows)
        leaving = full.hidden.index_select(0, _device_index(move_pos, device))
        if reduced is not None:  # from FastV's stream: back to full-stream positions first
            leaving = reduced.layout.spread(leaving, moved_index)
        arriving = ctx.text.layout.gather(leaving, moved_index, width)
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

    def _run_group(
        self, layer_idx: int, group: _Group, stream: _Stream | None, ctx: _Prefill, cache
    ) -> torch.Tensor:
        """Run one layer for one group, in the full stream (``stream`` None) or in a re-padded stream."""
        mask, c, s, pos = self._group_inputs(group, stream, ctx)
        if stream is None and layer_idx in ctx.frozen:
            plan = self._frozen_plan(group, ctx)
            return frozen_layer_forward(
                self.lm.layers[layer_idx], layer_idx, group.hidden, c, s, plan, cache, ctx.kwargs
            )
        return self._run_layer(layer_idx, group.hidden, mask, c, s, pos, cache, ctx.use_cache, ctx.kwargs)

    def _frozen_plan(self, group: _Group, ctx: _Prefill) -> FrozenPlan:
        """The frozen layers' plan for the group's rows, built at the first frozen layer they reach."""
        rows = group.index
        cached = ctx.frozen_plans.get(id(rows))
        if cached is not None and cached[0] is rows:
            return cached[1]
        padding = None if ctx.padding is None else ctx.padding[rows]
        layout = ctx.text.layout.select(rows, ctx.text.width(ctx.plan, group.rows))
        plan = frozen_plan(ctx.visual[rows], padding, ctx.cos[rows], ctx.sin[rows], self.lm.config, ctx.like.dtype,
                           layout=layout)  # fmt: skip
        ctx.frozen_plans[id(rows)] = (rows, plan)
        return plan

    @staticmethod
    def _group_inputs(group: _Group, stream: _Stream | None, ctx: _Prefill):
        """Mask, rotary tables and position ids of one group's rows in its stream."""
        rows = group.index
        whole = len(group) == ctx.batch and group.rows == list(range(ctx.batch))
        if stream is None:
            mask = ctx.full_mask if whole or ctx.full_mask is None else ctx.full_mask[rows]
            c, s = (ctx.cos, ctx.sin) if whole else (ctx.cos[rows], ctx.sin[rows])
            pos = ctx.full_positions if whole or ctx.full_positions is None else ctx.full_positions[rows]
            return mask, c, s, pos
        width = group.hidden.shape[1]
        mask = stream.masks.for_rows(rows, width, stream.padded(ctx.plan, group.rows, width))
        start = stream.cos.shape[1] - width
        c, s = (stream.cos, stream.sin) if whole else (stream.cos[rows, start:], stream.sin[rows, start:])
        return mask, c, s, None  # gathered positions have gaps; flash-attention would read them as packed

    # ------------------------------------------------------------------ graph-captured segments
    def _decides_in_graph(self, rule: StagedExitRule, stop: int, fastv, full: _Group) -> bool:
        """Whether the rule is asked after layer ``stop`` - 1 and can be asked inside the segment's graph: not at
        FastV's layer, where the loop asks it after pruning (on the reduced stream)."""
        if not len(full) or stop - 1 not in rule.asked_layers:
            return False
        return fastv is None or stop != fastv.layer

    def _graphs_for(self, batch: int, device: torch.device, kwargs: dict[str, Any], attention_mask: Any,
                    cache: Any) -> SegmentGraphs | None:  # fmt: skip
        """The recorder when this prefill's segments are recorded as graphs, else None (layer by layer, or the
        stock forward when nothing is withdrawn: what the prefill would do without graphs).

        Whatever the recorder would have to freeze into a graph, or that the stock forward handles and the
        engine does not, keeps the eager path: gradients, training mode, tensor keyword arguments, output of
        hidden states or attentions, a prepared 4-D mask, attention other than SDPA or eager, sliding-window
        layers, a cache other than ``DynamicCache``, a decoder spread over several devices.
        """
        graphs = self.controller.graphs
        if graphs is None:
            return None
        config = self.lm.config
        recordable = (
            graphs.active_for(device, batch)
            and not self.lm.training
            and kwargs_are_constants(kwargs)
            and not any(kwargs.get(name) for name in _UNSUPPORTED_OUTPUTS)
            and (
                attention_mask is None
                or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2)
            )
            and config._attn_implementation in ("sdpa", "eager")
            and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or [])
            and (cache is None or type(cache) is DynamicCache or isinstance(cache, WithdrawalCache))
            and graphs.check_model(self.lm)
        )
        if not recordable:
            graphs.stats.eager += 1
            return None
        return graphs

    def _run_segment(self, first: int, stop: int, full: _Group, text: _Group, reduced: _Stream | None,
                     ctx: _Prefill, cache, graphs: SegmentGraphs,
                     rule: StagedExitRule | None = None) -> tuple[list[str], _Asked | None]:  # fmt: skip
        """Layers ``first``..``stop``-1, in which no sample changes group, one recorded segment per group.

        With ``rule``, the full group's segment also takes the rule's decision after layer ``stop`` - 1,
        so asking it costs no launch of its own.
        """
        with_kv = cache is not None
        ran: list[tuple[_Group, list[torch.Tensor], list[torch.Tensor]]] = []
        asked = None
        for group, stream in ((full, reduced), (text, ctx.text)):
            if not len(group):
                continue
            mask, c, s, pos = self._group_inputs(group, stream, ctx)
            stream_name = FULL if stream is None else stream.name
            inputs: list[torch.Tensor | None] = [group.hidden, mask, c, s, pos] + [None] * 6
            # ShortV's frozen layers apply in the full stream; their plan is an input too.
            frozen = tuple(i for i in range(first, stop) if i in ctx.frozen) if stream is None else ()
            if frozen:
                inputs[5:10] = self._frozen_plan(group, ctx).tensors()
            deciding = rule if group is full else None
            if deciding is not None:
                seen = (
                    (ctx.visual, ctx.padding) if reduced is None else (reduced.visual, reduced.layout.valid)
                )
                inputs[10] = deciding.prepare(group.index, *seen)
            # Everything the segment's Python code branches on or bakes in, beyond the input shapes.
            key = (first, stop, stream_name, with_kv, frozen, None if deciding is None else deciding.graph_key(),
                   self.lm.config._attn_implementation, repr(sorted(ctx.kwargs.items())))  # fmt: skip
            segment = self._segment(first, stop, with_kv, ctx.kwargs, frozen, deciding)
            outputs, replayed = graphs.run(key, segment, inputs, shared=_CONTEXT_INPUTS)
            if deciding is not None:
                outputs, (probability, fire) = outputs[:-2], outputs[-2:]
                # Both stay in this graph's buffers, which nothing replays again in this prefill: the decision
                # goes to the lagged reader at the next cut, the probability to the rule at the end.
                asked = _Asked(stop - 1, list(group.rows), probability, fire)
            group.hidden, keys, values = self._segment_outputs(outputs, stop - first, with_kv, replayed)
            ran.append((group, keys, values))
        if len(ran) == 1:
            group, keys, values = ran[0]
            name = FULL if group is full and reduced is None else (reduced.name if group is full else TEXT)
            for offset, (k, v) in enumerate(zip(keys, values, strict=True)):
                _put_layer(cache, first + offset, k, v)
            return [name] * (stop - first), asked
        if with_kv:
            (_, full_keys, full_values), (_, text_keys, text_values) = ran
            for offset in range(stop - first):
                captures = (_CaptureKV(), _CaptureKV())
                captures[0].keys, captures[0].values = full_keys[offset], full_values[offset]
                captures[1].keys, captures[1].values = text_keys[offset], text_values[offset]
                self._store_grouped(cache, first + offset, captures, full, text, reduced, ctx)
        return [MIXED] * (stop - first), asked

    def _segment(self, first: int, stop: int, with_kv: bool, kwargs: dict[str, Any], frozen: tuple[int, ...],
                 rule: StagedExitRule | None):  # fmt: skip
        """Layers ``first``..``stop``-1 as a pure function of tensors: it returns its keys and values instead
        of writing a cache, because a recorded graph replays kernels, not Python side effects. With ``rule``,
        it also returns the rule's probability and decision after its last layer."""

        def segment(hidden, mask, cos, sin, positions, *frozen_and_prepared):
            *plan_tensors, prepared = frozen_and_prepared
            plan = FrozenPlan.from_tensors(*plan_tensors) if frozen else None
            keys, values = [], []
            for layer_idx in range(first, stop):
                capture = _CaptureKV() if with_kv else None
                if layer_idx in frozen:
                    layer = self.lm.layers[layer_idx]
                    hidden = frozen_layer_forward(layer, layer_idx, hidden, cos, sin, plan, capture, kwargs)
                else:
                    hidden = self._run_layer(
                        layer_idx, hidden, mask, cos, sin, positions, capture, with_kv, kwargs
                    )
                if capture is not None:
                    keys.append(capture.keys)
                    values.append(capture.values)
            if rule is None:
                return (hidden, *keys, *values)
            probability, fire = rule.decide(stop - 1, hidden, prepared)
            return (hidden, *keys, *values, probability, fire)

        return segment

    @staticmethod
    def _segment_outputs(outputs, layers: int, with_kv: bool, replayed: bool):
        """Hidden states, keys and values of a segment; replay buffers' keys and values are copied out first
        (one ``stack`` each), since the next replay of that graph overwrites them."""
        hidden = outputs[0]
        if not with_kv:
            return hidden, [], []
        keys, values = list(outputs[1 : 1 + layers]), list(outputs[1 + layers : 1 + 2 * layers])
        if replayed:
            keys, values = list(torch.stack(keys).unbind(0)), list(torch.stack(values).unbind(0))
        return hidden, keys, values

    def _store_grouped(
        self, cache, layer_idx, captures, full: _Group, text: _Group, reduced: _Stream | None, ctx: _Prefill
    ) -> None:
        """Keep a layer where the two groups ran apart as one group per stream (nothing re-padded to full)."""
        full_kv, text_kv = captures
        text_width = text_kv.keys.shape[-2]
        if reduced is None:
            first = KVGroup(full.rows, FULL, full_kv.keys, full_kv.values)
        else:
            offset = reduced.layout.length - full_kv.keys.shape[-2]
            first = KVGroup(full.rows, REDUCED, full_kv.keys, full_kv.values, offset=offset)
        groups = [
            first,
            KVGroup(
                text.rows, TEXT, text_kv.keys, text_kv.values, offset=ctx.text.layout.length - text_width
            ),
        ]
        while len(cache.layers) <= layer_idx:
            cache.layers.append(DynamicLayer())
        cache.layers[layer_idx] = GroupedLayer(groups, ctx.batch)

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

        # One mask per stream, and one per distinct group of rows in mixed layers (shared by the layers
        # whose groups are the same rows): the count grows with the distinct exits, not with depth.
        masks: dict[Any, Any] = {}
        built: dict[Any, Any] = {}
        stream_masks = state.stream_masks()
        # A layer is mixed when its cache holds groups of rows (which it keeps after a row selection,
        # even if one group is left: its rows keep their own width).
        layouts = [
            MIXED if isinstance(cache.layers[i], GroupedLayer) else kind
            for i, kind in enumerate(state.layer_streams)
        ]
        config = self.lm.config
        for layer_idx, kind in enumerate(layouts):
            if kind == MIXED:
                layer = cache.layers[layer_idx]
                masks[layer_idx] = group_masks(
                    layer, stream_masks, length, config, inputs_embeds.dtype, built
                )
            elif kind not in masks:
                pos = positions.text if kind == FULL else None
                masks[kind] = self._mask(inputs_embeds, stream_masks[kind], cache, pos, layer_idx)

        hidden = inputs_embeds
        use_cache = True if use_cache is None else use_cache
        for layer_idx, kind in enumerate(layouts):
            if kind == MIXED:
                with grouped_attention_for(config):
                    hidden = self._run_layer(
                        layer_idx, hidden, masks[layer_idx], cos, sin, None, cache, use_cache, kwargs
                    )
                continue
            pos = positions.text if kind == FULL else None
            hidden = self._run_layer(layer_idx, hidden, masks[kind], cos, sin, pos, cache, use_cache, kwargs)
        hidden = self.lm.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)
