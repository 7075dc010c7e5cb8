"""Installing the engine on a model, and the handle users steer it with.

The reduction lives on the controller, not in ``forward`` kwargs, because ``generate()``
rejects unknown keyword arguments (docs/engine.md, trap 6). It is read once per prefill; a
cache carries the decision of its prefill through every decode step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..adapters import base_model_of
from ..errors import WithdrawalError
from .families import FamilyAdapter, adapter_for
from .forward import WithdrawalForward
from .graphs import Capture, GraphSettings, SegmentGraphs
from .reduction import FULL, ExitLayer, Reduction

_ATTR = "_vtw_controller"


class ExitController:
    """Steers visual-token reduction on one model. Obtain it from :func:`attach`.

    Its whole state is one :class:`~vtw_train.engine.Reduction`: set ``reduction`` (or use
    ``with controller.using(...)``) to change how tokens are reduced; ``exit_layer`` is a
    shortcut for the most common case, VTW's fixed K.
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter) -> None:
        self.model = model
        self.adapter = adapter
        self.language_model = adapter.language_model(model)
        self.wrapper = adapter.wrapper(model)
        self.num_layers: int = len(self.language_model.layers)
        self.visual_token_ids: tuple[int, ...] = adapter.visual_token_ids(model)
        self._reduction: Reduction = FULL
        self._pending_visual: torch.Tensor | None = None
        self.last_exit_layers: torch.Tensor | None = None
        self._hooks: list[Any] = []
        self._installed = False
        self._generate_depth = 0
        self._graphs: SegmentGraphs | None = None

    # ------------------------------------------------------------------ public
    @property
    def reduction(self) -> Reduction:
        """How visual tokens are reduced in the next prefill (``Reduction()``: the full model)."""
        return self._reduction

    @reduction.setter
    def reduction(self, value: Reduction | None) -> None:
        self._reduction = self._checked(FULL if value is None else value)

    @property
    def exit_layer(self) -> ExitLayer:
        """``None`` (no fixed exit), an int K in ``[0, num_layers]``, or a LongTensor ``[batch]`` of K per sample.

        Setting it changes only the exit layer of the current reduction.
        """
        return self._reduction.exit_layer

    @exit_layer.setter
    def exit_layer(self, value: ExitLayer) -> None:
        try:
            candidate = self._reduction.replace(exit_layer=value)
        except WithdrawalError as err:
            raise WithdrawalError(f"{err} Valid exit layers are [0, {self.num_layers}].") from None
        self._reduction = self._checked(candidate)

    @contextmanager
    def using(self, reduction: Reduction | None = None, /, **fields: Any) -> Iterator[ExitController]:
        """Run a block under ``reduction`` (or ``Reduction(**fields)``), then restore the previous one.

        The block gets exactly that reduction: fields not given are off, never inherited from
        the reduction in place before, so one strategy cannot leak into the next.
        """
        if reduction is not None and fields:
            raise TypeError("using() takes a Reduction or its fields, not both.")
        if reduction is None:
            try:
                reduction = Reduction(**fields)
            except WithdrawalError as err:
                raise WithdrawalError(f"{err} Valid exit layers are [0, {self.num_layers}].") from None
        previous = self._reduction
        self.reduction = reduction
        try:
            yield self
        finally:
            self._reduction = previous

    @property
    def graphs(self) -> SegmentGraphs | None:
        """The graph recorder of graph-captured prefill (None: off). Its ``stats`` say what it did."""
        return self._graphs

    def enable_graphs(
        self,
        settings: GraphSettings | None = None,
        *,
        capture: Capture | None = None,
        recorder: SegmentGraphs | None = None,
    ) -> SegmentGraphs:
        """Record prefill segments as CUDA graphs and replay them (opt-in; results equal the eager path's).

        Pays off where launches, not the GPU, bound the prefill: batch 1 to a few rows on a large GPU.
        Applies under ``torch.no_grad()`` / ``inference_mode()`` with the model in eval mode, to prompts
        with visual tokens, under any reduction (the gate's step is recorded with the layers before it).
        Elsewhere, and on a CPU, prefill runs eagerly as before. A graph is
        recorded per segment and shape on first use (a few eager runs, then one capture), so time a
        warm model. ``capture`` replaces the CUDA recorder (tests use a CPU stand-in); ``recorder`` turns
        graphs back on with the graphs a ``disable_graphs(release=False)`` kept.
        """
        if recorder is not None:
            if settings is not None or capture is not None:
                raise TypeError("enable_graphs() takes a recorder or settings and capture, not both.")
        else:
            recorder = SegmentGraphs(settings, capture=capture)
        if self._graphs is not None and self._graphs is not recorder:
            self._graphs.clear()
        self._graphs = recorder
        return recorder

    def disable_graphs(self, release: bool = True) -> SegmentGraphs | None:
        """Back to eager prefill everywhere. Recorded graphs are released, or kept in the returned recorder
        with ``release=False`` (to compare eager and graphed runs without recording again)."""
        recorder, self._graphs = self._graphs, None
        if recorder is not None and release:
            recorder.clear()
        return recorder

    def visual_positions(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """``[B, T]`` bool: where the visual tokens of a prompt sit (None when neither input is given)."""
        return self._visual_mask(input_ids, inputs_embeds)

    def detach(self) -> None:
        """Restore the original model: the stock decoder forward, no hooks, no controller."""
        if not self._installed:
            return
        self.disable_graphs()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if "forward" in self.language_model.__dict__:
            del self.language_model.forward
        if "generate" in self.model.__dict__:
            del self.model.generate
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)
        self._installed = False

    @property
    def attached(self) -> bool:
        return self._installed

    # ------------------------------------------------------------------ engine-facing
    def _checked(self, reduction: Reduction) -> Reduction:
        if not isinstance(reduction, Reduction):
            raise WithdrawalError(
                f"controller.reduction must be a vtw_train.engine.Reduction, got {type(reduction).__name__}."
            )
        return reduction.validate(self.num_layers)

    def resolve_exit_layers(self, batch: int, device: torch.device) -> torch.Tensor | None:
        value = self._reduction.exit_layer
        if value is None:
            if self._reduction.exit_rule is None:
                return None
            return torch.full((batch,), self.num_layers, dtype=torch.long, device=device)
        if isinstance(value, int):
            return torch.full((batch,), value, dtype=torch.long, device=device)
        if value.numel() == batch:
            return value.to(device)
        if value.numel() == 1:  # one K for everyone, like an int
            return value.to(device).expand(batch).clone()
        if self._generate_depth and value.numel() and batch % value.numel() == 0:
            # generate() expands each prompt to num_beams x num_return_sequences rows, interleaved.
            return value.to(device).repeat_interleave(batch // value.numel())
        raise WithdrawalError(
            f"exit_layer has {value.numel()} entries but the batch has {batch} samples; give one K per sample."
        )

    def record_exits(self, exits: torch.Tensor | None) -> None:
        self.last_exit_layers = None if exits is None else exits.detach().clone()

    def take_visual_mask(self) -> torch.Tensor | None:
        mask, self._pending_visual = self._pending_visual, None
        return mask

    def _visual_mask(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor | None:
        if input_ids is not None:
            ids = torch.tensor(self.visual_token_ids, device=input_ids.device)
            return torch.isin(input_ids, ids)
        if inputs_embeds is not None:
            # Same rule as transformers' get_placeholder_mask when only embeddings are given.
            embed = self.language_model.get_input_embeddings()
            ids = torch.tensor(self.visual_token_ids, device=inputs_embeds.device)
            targets = embed(ids).to(inputs_embeds.dtype)  # [n_ids, D]
            return (inputs_embeds.unsqueeze(2) == targets.view(1, 1, *targets.shape)).all(-1).any(-1)
        return None

    def _wrapper_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._pending_visual = self._visual_mask(input_ids, kwargs.get("inputs_embeds"))

    def _wrapper_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._pending_visual = None

    def _wrap_generate(self, generate: Callable) -> Callable:
        """Mark calls inside ``generate()``, the one place where a per-prompt K may be expanded.

        generate() repeats each prompt num_beams x num_return_sequences times before the first
        forward; outside it, a K tensor whose length differs from the batch is a mistake.
        """

        @functools.wraps(generate)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self._generate_depth += 1
            try:
                return generate(*args, **kwargs)
            finally:
                self._generate_depth -= 1

        return wrapped

    def _install(self) -> None:
        lm = self.language_model
        original = lm.forward  # bound stock forward, decorators included
        lm.forward = WithdrawalForward(self, lm, original)
        self.model.generate = self._wrap_generate(self.model.generate)
        self._hooks.append(self.wrapper.register_forward_pre_hook(self._wrapper_pre_hook, with_kwargs=True))
        self._hooks.append(self.wrapper.register_forward_hook(self._wrapper_post_hook, with_kwargs=True))
        setattr(self.model, _ATTR, self)
        self._installed = True


def attach(model: nn.Module) -> ExitController:
    """Install the withdrawal engine on ``model`` in place and return its controller.

    Idempotent: attaching twice returns the same controller. Works on a peft-wrapped model
    too (the engine sits below the adapters). A new controller starts with the full model.
    Raises :class:`~vtw_train.UnsupportedModelError` for model classes without an adapter.
    """
    adapter = adapter_for(model)
    base = base_model_of(model)
    existing = getattr(base, _ATTR, None)
    if isinstance(existing, ExitController) and existing.attached:
        return existing
    controller = ExitController(base, adapter)
    controller._install()
    return controller


def controller_of(model: nn.Module) -> ExitController | None:
    """The controller attached to ``model`` (or its peft base), if any."""
    return getattr(base_model_of(model), _ATTR, None)
