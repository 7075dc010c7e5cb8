"""Point the exit engine (and the LoRA adapters) at one strategy.

Every field of the controller is set on every call, never only the ones a strategy uses,
so a strategy can never inherit a setting from the one measured before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..engine import ExitController
from ..gate import ExitGate, GateExitRule
from ..methods.fastv import FastV
from ..methods.shortv import ShortVRecord
from ..methods.vispruner import VisPruner
from .strategies import Strategy


def frozen_layers_of(strategy: Strategy, shortv: ShortVRecord | None) -> frozenset[int]:
    """ShortV's frozen layers; composed with VTW, only those before the exit K (the rest see no visual rows)."""
    if strategy.shortv_layers is None:
        return frozenset()
    if shortv is None:
        raise ValueError(f"strategy {strategy.name!r} needs a ShortV Layer Contribution record")
    frozen = shortv.frozen_layers(strategy.shortv_layers)
    if strategy.exit_layer is not None:
        frozen = frozenset(layer for layer in frozen if layer < strategy.exit_layer)
    return frozen


def configure(
    controller: ExitController,
    strategy: Strategy,
    *,
    gate: ExitGate | None = None,
    shortv: ShortVRecord | None = None,
) -> None:
    """Set exit layer, gate, ShortV freezing and FastV on ``controller`` for ``strategy``."""
    controller.fastv = None
    controller.dynamic_exit = None
    controller.exit_layer = strategy.exit_layer
    controller.frozen_layers = frozen_layers_of(strategy, shortv)
    if strategy.uses_gate:
        if gate is None:
            raise ValueError(f"strategy {strategy.name!r} needs a learned gate (gated_checkpoint)")
        controller.dynamic_exit = GateExitRule(gate, tau=strategy.gate_tau)
    if strategy.fastv_layer is not None:
        controller.fastv = FastV(
            layer=strategy.fastv_layer, keep_ratio=float(strategy.fastv_keep_ratio or 0.0)
        )


def reset(controller: ExitController) -> None:
    """Back to the full model."""
    controller.fastv = None
    controller.dynamic_exit = None
    controller.exit_layer = None
    controller.frozen_layers = frozenset()


def pruner_of(strategy: Strategy) -> VisPruner | None:
    """A fresh VisPruner for the strategy (None when it does not prune before the LLM)."""
    if strategy.vispruner_tokens is None:
        return None
    return VisPruner(num_tokens=strategy.vispruner_tokens, important_ratio=strategy.important_ratio)


def set_adapters(model: nn.Module, enabled: bool) -> None:
    """Switch a peft model's LoRA layers on or off in place (no-op for a plain model).

    This is what ``PeftModel.disable_adapter()`` does on entry and exit; the timing loop needs
    the switch outside a ``with`` block, because its setup and timed calls are separate.
    """
    tuner: Any = getattr(model, "base_model", None)
    if not hasattr(model, "disable_adapter") or tuner is None:
        return
    if enabled:
        tuner.enable_adapter_layers()
    else:
        tuner.disable_adapter_layers()


@contextmanager
def adapters(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run a block with the LoRA adapters on (gate strategies) or off (everything else); always re-enable after."""
    set_adapters(model, enabled)
    try:
        yield
    finally:
        set_adapters(model, True)
