"""Installing the engine on a model, and the handle users steer it with.

The exit layer lives on the controller, not in ``forward`` kwargs, because ``generate()``
rejects unknown keyword arguments (ENGINE_NOTES trap 6). It is read once per prefill; a
cache carries the decision of its prefill through every decode step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import WithdrawalError
from .families import FamilyAdapter, adapter_for
from .families import _unwrap_peft as unwrap_peft
from .forward import WithdrawalForward

ExitLayer = int | torch.Tensor | None
#: ``f(layer, hidden_full_rows, rows, visual, padding) -> BoolTensor[len(rows)] | None``:
#: called after ``layer`` for the samples still reading visual tokens; True withdraws them
#: from ``layer + 1`` on. The learned gate plugs in here.
DynamicExit = Callable[
    [int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor | None
]

_ATTR = "_vtw_controller"


class ExitController:
    """Steers visual-token withdrawal on one model. Obtain it from :func:`attach`."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter) -> None:
        self.model = model
        self.adapter = adapter
        self.language_model = adapter.language_model(model)
        self.wrapper = adapter.wrapper(model)
        self.num_layers: int = len(self.language_model.layers)
        self.visual_token_ids: tuple[int, ...] = adapter.visual_token_ids(model)
        self._exit_layer: ExitLayer = None
        self._dynamic_exit: DynamicExit | None = None
        self._frozen_layers: frozenset[int] = frozenset()
        self._fastv: Any = None
        self._pending_visual: torch.Tensor | None = None
        self.last_exit_layers: torch.Tensor | None = None
        self._hooks: list[Any] = []
        self._installed = False
        self._generate_depth = 0

    # ------------------------------------------------------------------ public
    @property
    def exit_layer(self) -> ExitLayer:
        """``None`` (full model), an int K in ``[0, num_layers]``, or a LongTensor ``[batch]`` of K per sample."""
        return self._exit_layer

    @exit_layer.setter
    def exit_layer(self, value: ExitLayer) -> None:
        self._exit_layer = self._validate(value)

    @property
    def dynamic_exit(self) -> DynamicExit | None:
        """A per-input exit rule (the learned gate); when set it decides, capped by ``exit_layer`` if that is set."""
        return self._dynamic_exit

    @dynamic_exit.setter
    def dynamic_exit(self, rule: DynamicExit | None) -> None:
        self._dynamic_exit = rule

    @property
    def frozen_layers(self) -> frozenset[int]:
        """ShortV: layers in which visual tokens get no update (they still serve as keys/values)."""
        return self._frozen_layers

    @frozen_layers.setter
    def frozen_layers(self, layers) -> None:
        layers = frozenset(int(layer) for layer in (layers or ()))
        bad = sorted(layer for layer in layers if not 0 <= layer < self.num_layers)
        if bad:
            raise WithdrawalError(
                f"frozen_layers {bad} are out of range: decoder layers are [0, {self.num_layers - 1}]."
            )
        self._frozen_layers = layers

    @property
    def fastv(self):
        """FastV settings (``vtw_train.methods.fastv.FastV``) or None. Not combinable with exits."""
        return self._fastv

    @fastv.setter
    def fastv(self, settings) -> None:
        if settings is not None and not 1 <= settings.layer < self.num_layers:
            raise WithdrawalError(
                f"FastV layer {settings.layer} is out of range: valid layers are [1, {self.num_layers - 1}]."
            )
        self._fastv = settings

    @contextmanager
    def exiting_at(self, exit_layer: ExitLayer) -> Iterator[ExitController]:
        """Temporarily use ``exit_layer`` (for calibration and A/B comparisons)."""
        previous = self._exit_layer
        self.exit_layer = exit_layer
        try:
            yield self
        finally:
            self._exit_layer = previous

    def detach(self) -> None:
        """Restore the original model: the stock decoder forward, no hooks, no controller."""
        if not self._installed:
            return
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
    def _validate(self, value: ExitLayer) -> ExitLayer:
        valid = f"[0, {self.num_layers}]"
        if value is None:
            return None
        if isinstance(value, bool):
            raise WithdrawalError(
                f"exit_layer must be None, an int in {valid} or a LongTensor [batch]; got a bool."
            )
        if isinstance(value, int):
            if not 0 <= value <= self.num_layers:
                raise WithdrawalError(f"exit_layer={value} is out of range: valid exit layers are {valid}.")
            return value
        if isinstance(value, torch.Tensor):
            if value.dim() != 1 or value.dtype not in (
                torch.int64,
                torch.int32,
                torch.int16,
                torch.int8,
                torch.uint8,
            ):
                raise WithdrawalError(
                    f"A per-sample exit_layer must be a 1-D integer tensor [batch] with values in {valid} "
                    f"(valid exit layers are {valid}); got dtype {value.dtype} and shape {tuple(value.shape)}."
                )
            if value.numel() and (int(value.min()) < 0 or int(value.max()) > self.num_layers):
                raise WithdrawalError(
                    f"exit_layer values {value.tolist()} are out of range: valid exit layers are {valid}."
                )
            return (
                value.detach().long().clone()
            )  # a copy: later edits to the caller's tensor must not bypass checks
        raise WithdrawalError(
            f"exit_layer must be None, an int in {valid} or a LongTensor [batch]; got {type(value).__name__}."
        )

    def _resolve_exit_layers(self, batch: int, device: torch.device) -> torch.Tensor | None:
        value = self._exit_layer
        if value is None:
            if self._dynamic_exit is None:
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

    def _record_exits(self, exits: torch.Tensor | None) -> None:
        self.last_exit_layers = None if exits is None else exits.detach().clone()

    def _take_visual_mask(self) -> torch.Tensor | None:
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
    too (the engine sits below the adapters). Raises :class:`~vtw_train.UnsupportedModelError`
    for model classes without an adapter.
    """
    adapter = adapter_for(model)
    base = unwrap_peft(model)
    existing = getattr(base, _ATTR, None)
    if isinstance(existing, ExitController) and existing.attached:
        return existing
    controller = ExitController(base, adapter)
    controller._install()
    return controller


def controller_of(model: nn.Module) -> ExitController | None:
    """The controller attached to ``model`` (or its peft base), if any."""
    return getattr(unwrap_peft(model), _ATTR, None)
