"""One value that says how visual tokens are reduced: :class:`Reduction`.

Why one value: an exit layer, a per-input exit rule, frozen layers, in-layer pruning and
pre-LLM pruning are five knobs of one decision, and a strategy must never inherit a knob from
the strategy measured before it. A ``Reduction`` is immutable and complete: the engine applies
it whole (``with controller.using(reduction):``), comparisons name it, and the FLOPs plan of a
sample is derived from it (:meth:`Reduction.flops_plan`), so the number reported is the number
run.

The engine imports no method. Methods plug in through two small protocols:
:class:`InLayerPruning` (FastV: which visual tokens survive a layer) and :class:`InputPruner`
(VisPruner: rewrite a batch before the model sees it). Exit rules (the learned gate) are plain
callables, :data:`ExitRule`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import WithdrawalError
from ..flops import ExitPlan

#: ``f(layer, hidden_full_rows, rows, visual, padding) -> BoolTensor[len(rows)] | None``: called
#: after ``layer`` for the samples still reading visual tokens; True withdraws them from
#: ``layer + 1 + lag`` on. The learned gate plugs in here. Optional attributes: ``lag`` (int, default
#: 0) and ``asked_layers`` (the layers after which it may fire, default every layer), which lets
#: graph-captured prefill record the layers in between as one graph.
ExitRule = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor | None]

ExitLayer = int | torch.Tensor | None


@runtime_checkable
class StagedExitRule(Protocol):
    """An exit rule whose per-layer step is a pure function of tensors (optional; the gate is one).

    Graph-captured prefill records ``decide`` into the graph of the layers before it, so asking the
    rule launches nothing of its own; the layer-by-layer loop calls the rule itself as usual.
    """

    lag: int
    asked_layers: frozenset[int]

    def prepare(self, rows: torch.Tensor, visual: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """Tensors the decisions of ``rows`` need at every asked layer (computed once, outside any graph)."""
        ...

    def decide(
        self, layer: int, hidden: torch.Tensor, prepared: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probability [n], fire [n] bool)`` after ``layer``; no Python state may change here."""
        ...

    def observe(self, layer: int, probability: torch.Tensor) -> None:
        """Told the probability of a decision taken inside a graph (what ``__call__`` would have kept)."""
        ...

    def graph_key(self) -> Any:
        """Everything ``decide`` bakes into a recorded graph (thresholds, where its weights live)."""
        ...


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@runtime_checkable
class InLayerPruning(Protocol):
    """Keep some visual tokens from ``layer`` on, chosen from layer ``layer - 1``'s input (FastV)."""

    layer: int

    def kept_count(self, n_visual: int) -> int:
        """Visual tokens kept of ``n_visual`` entering."""
        ...

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
        """``[B, T]`` bool: visual positions to keep, from layer ``layer - 1``'s input ``hidden``.

        ``visual_counts``: each row's visual tokens, when the caller knows them (no host sync).
        """
        ...


@runtime_checkable
class InputPruner(Protocol):
    """Rewrite a batch before the language model sees it (VisPruner keeps T tokens per image)."""

    num_tokens: int

    def prepare(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Model inputs with fewer visual tokens; :meth:`kept_visual_tokens` then reports the counts."""
        ...

    def kept_visual_tokens(self) -> list[int]:
        """Visual tokens per sample that the last :meth:`prepare` let into the language model."""
        ...


def _check_exit_layer(value: Any) -> ExitLayer:
    if value is None:
        return None
    if isinstance(value, bool):
        raise WithdrawalError("exit_layer must be None, an int or a LongTensor [batch]; got a bool.")
    if isinstance(value, int):
        if value < 0:
            raise WithdrawalError(f"exit_layer={value} is out of range: exit layers are >= 0.")
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype not in _INT_DTYPES:
            raise WithdrawalError(
                "A per-sample exit_layer must be a 1-D integer tensor [batch]; "
                f"got dtype {value.dtype} and shape {tuple(value.shape)}."
            )
        # A copy: later edits to the caller's tensor must not bypass the checks.
        return value.detach().long().clone()
    raise WithdrawalError(
        f"exit_layer must be None, an int or a LongTensor [batch]; got {type(value).__name__}."
    )


@dataclass(frozen=True, eq=False)
class Reduction:
    """How visual tokens are reduced in one forward or ``generate`` call; the default is the full model.

    exit_layer: VTW's K (an int in ``[0, num_layers]``), one K per sample (a 1-D integer tensor),
        or None. Layers ``K..L-1`` see text tokens only and their cache holds text only.
    exit_rule: a per-input exit rule (the learned gate) asked after each layer; with
        ``exit_layer`` also set, no sample exits later than ``exit_layer``.
    frozen_layers: ShortV's layers, in which visual tokens serve as keys and values but get no
        update (prefill only; the cache keeps them).
    pruning: FastV's in-layer pruning (an :class:`InLayerPruning`, e.g.
        ``vtw_train.methods.FastV``). With an exit or an exit rule, a sample keeps FastV's tokens
        from FastV's layer until its exit (DyVTE's FastV variant); an exit at or before FastV's
        layer makes the pruning moot for that sample. ShortV's frozen layers must come before
        FastV's layer (they freeze the full set of visual tokens).
    input_pruner: VisPruner (an :class:`InputPruner`), applied to a batch before the model by
        the evaluation loop (:meth:`prepare_inputs`); the controller does not call it.
    """

    exit_layer: ExitLayer = None
    exit_rule: ExitRule | None = None
    frozen_layers: frozenset[int] = field(default_factory=frozenset)
    pruning: InLayerPruning | None = None
    input_pruner: InputPruner | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "exit_layer", _check_exit_layer(self.exit_layer))
        object.__setattr__(self, "frozen_layers", _frozen(self.frozen_layers))
        if self.exit_rule is not None and not callable(self.exit_rule):
            raise WithdrawalError(f"exit_rule must be callable (see ExitRule); got {self.exit_rule!r}.")
        if self.pruning is not None and not isinstance(self.pruning, InLayerPruning):
            raise WithdrawalError(
                f"pruning must provide layer, kept_count() and select() (e.g. FastV); got {self.pruning!r}."
            )
        if self.input_pruner is not None and not isinstance(self.input_pruner, InputPruner):
            raise WithdrawalError(
                f"input_pruner must provide prepare() and kept_visual_tokens() (e.g. VisPruner); "
                f"got {self.input_pruner!r}."
            )

    # ------------------------------------------------------------------ what it does
    @property
    def is_full(self) -> bool:
        """True when nothing is reduced (the stock model runs)."""
        return (
            self.exit_layer is None
            and self.exit_rule is None
            and not self.frozen_layers
            and self.pruning is None
            and self.input_pruner is None
        )

    @property
    def withdraws(self) -> bool:
        """Whether samples exit (a fixed K or an exit rule), so an exit layer per sample is recorded."""
        return self.exit_layer is not None or self.exit_rule is not None

    def replace(self, **changes: Any) -> Reduction:
        """A copy with some fields changed (the rest kept)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Reduction(**values)

    def validate(self, num_layers: int) -> Reduction:
        """Check the bounds that depend on the decoder depth; returns ``self``."""
        valid = f"[0, {num_layers}]"
        k = self.exit_layer
        if isinstance(k, int) and not 0 <= k <= num_layers:
            raise WithdrawalError(f"exit_layer={k} is out of range: valid exit layers are {valid}.")
        if isinstance(k, torch.Tensor) and k.numel() and (int(k.min()) < 0 or int(k.max()) > num_layers):
            raise WithdrawalError(
                f"exit_layer values {k.tolist()} are out of range: valid exit layers are {valid}."
            )
        bad = sorted(layer for layer in self.frozen_layers if not 0 <= layer < num_layers)
        if bad:
            raise WithdrawalError(
                f"frozen_layers {bad} are out of range: decoder layers are [0, {num_layers - 1}]."
            )
        if self.pruning is not None and not 1 <= self.pruning.layer < num_layers:
            raise WithdrawalError(
                f"FastV layer {self.pruning.layer} is out of range: valid layers are [1, {num_layers - 1}]."
            )
        late = sorted(
            layer for layer in self.frozen_layers if self.pruning is not None and layer >= self.pruning.layer
        )
        if late:
            raise WithdrawalError(
                f"frozen_layers {late} come at or after FastV's layer {self.pruning.layer}: ShortV freezes the "
                "full set of visual tokens, which FastV has pruned by then. Freeze only layers before FastV's."
            )
        return self

    # ------------------------------------------------------------------ around the model call
    def prepare_inputs(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Apply the pre-LLM pruner, if any, to a batch (a plain copy otherwise)."""
        if self.input_pruner is None:
            return dict(inputs)
        return self.input_pruner.prepare(model, inputs)

    def kept_visual_tokens(self) -> list[int] | None:
        """Visual tokens per sample that entered the language model in the last :meth:`prepare_inputs`."""
        return None if self.input_pruner is None else list(self.input_pruner.kept_visual_tokens())

    def flops_plan(
        self, *, n_visual: int, kept_visual: int | None = None, exit_layer: int | None = None
    ) -> ExitPlan:
        """The FLOPs plan of one sample run under this reduction.

        ``kept_visual``: tokens the input pruner let in (None: no pre-LLM pruning);
        ``exit_layer``: where this sample withdrew (None: never). FastV keeps
        ``kept_count(entering)`` tokens, as the engine does.
        """
        pruning = None
        if self.pruning is not None:
            entering = n_visual if kept_visual is None else kept_visual
            pruning = (self.pruning.layer, self.pruning.kept_count(entering))
        return ExitPlan(
            exit_layer=exit_layer,
            kept_visual_tokens=kept_visual,
            fastv=pruning,
            frozen_layers=self.frozen_layers,
        )

    def describe(self) -> dict[str, Any]:
        """The settings that are on, for reports and JSON (primitives only)."""
        out: dict[str, Any] = {}
        if isinstance(self.exit_layer, int):
            out["exit_layer"] = self.exit_layer
        elif isinstance(self.exit_layer, torch.Tensor):
            out["exit_layer"] = self.exit_layer.tolist()
        if self.exit_rule is not None:
            tau = getattr(self.exit_rule, "tau", None)
            out["exit_rule"] = type(self.exit_rule).__name__ if tau is None else f"gate tau={tau:g}"
        if self.frozen_layers:
            out["frozen_layers"] = sorted(self.frozen_layers)
        if self.pruning is not None:
            out["pruning"] = {
                "layer": self.pruning.layer,
                "keep_ratio": getattr(self.pruning, "keep_ratio", None),
            }
        if self.input_pruner is not None:
            out["input_pruner"] = repr(self.input_pruner)
        return out


def _frozen(layers: Iterable[int] | None) -> frozenset[int]:
    try:
        values = list(layers or ())
    except TypeError:
        raise WithdrawalError(f"frozen_layers must be a set of layer indices, got {layers!r}.") from None
    out = set()
    for layer in values:
        if isinstance(layer, bool) or not isinstance(layer, (int, torch.Tensor)) or int(layer) != layer:
            raise WithdrawalError(f"frozen_layers must hold layer indices (ints), got {layer!r}.")
        out.add(int(layer))
    return frozenset(out)


#: The full model: nothing reduced.
FULL = Reduction()
