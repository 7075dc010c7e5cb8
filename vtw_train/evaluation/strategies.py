"""Which strategies a harness run compares, as a typed sweep, and their expansion into a flat list.

Why a sweep and not a free-form list: every method has one or two knobs (VTW's K, VisPruner's
T, ...), and a side-by-side comparison wants a handful of values per knob. A sweep per family
keeps the YAML short, and jsonargparse checks every key and type against these dataclasses.
:func:`expand_strategies` turns the sweep into named :class:`Strategy` objects, checking the
values that depend on the model (its depth) and naming the offending config key on error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..engine import FULL, Reduction

if TYPE_CHECKING:
    from ..calibration import ShortVRecord
    from ..gate import ExitGate

__all__ = [
    "FAMILIES",
    "FastVExit",
    "FastVGate",
    "FastVSetting",
    "PrunedExit",
    "PrunedGate",
    "ShortVExit",
    "Strategy",
    "StrategySweep",
    "expand_strategies",
]

#: Method family labels, in the order the reports list them (one plot curve per family).
FAMILIES = (
    "full",
    "VTW",
    "VTW calibrated",
    "VTW answer-KL",
    "LoRA+VTW",
    "gate",
    "VisPruner",
    "random tokens",
    "ShortV",
    "FastV",
    "VisPruner+VTW",
    "VisPruner+gate",
    "ShortV+VTW",
    "FastV+VTW",
    "FastV+gate",
)


@dataclass
class FastVSetting:
    """FastV at layer K (>= 1), keeping ``keep_ratio`` of each sample's visual tokens."""

    layer: int
    """FastV's layer K (scores come from layer K - 1)."""
    keep_ratio: float = 0.5
    """Share of each sample's visual tokens kept from layer K on."""


@dataclass
class FastVExit:
    """FastV at its layer, then VTW withdraws the visual tokens FastV kept before layer K."""

    layer: int
    """FastV's layer (scores come from the layer before)."""
    keep_ratio: float
    """Share of each sample's visual tokens FastV keeps."""
    exit_layer: int
    """VTW's K (an exit at or before FastV's layer makes the pruning moot)."""


@dataclass
class FastVGate:
    """FastV at its layer, then the learned gate decides when to withdraw what FastV kept (DyVTE's FastV
    variant prunes at layer 1 to half the tokens, then gates)."""

    layer: int
    """FastV's layer."""
    keep_ratio: float
    """Share of each sample's visual tokens FastV keeps."""
    tau: float
    """The gate's threshold."""


@dataclass
class PrunedExit:
    """VisPruner to T tokens per image, then VTW withdraws the kept ones before layer K."""

    tokens: int
    """VisPruner's T."""
    exit_layer: int
    """VTW's K."""


@dataclass
class PrunedGate:
    """VisPruner to T tokens per image, then the learned gate decides when to withdraw them."""

    tokens: int
    """VisPruner's T."""
    tau: float
    """The gate's threshold."""


@dataclass
class ShortVExit:
    """ShortV's N least-contributing layers, frozen only below the exit K, then VTW at K."""

    frozen: int
    """ShortV's N."""
    exit_layer: int
    """VTW's K."""


@dataclass
class StrategySweep:
    """The strategies to compare; the full model always runs (it is every ratio's reference)."""

    vtw: list[int] = field(default_factory=list)
    """Fixed exit layers K for training-free VTW."""
    vtw_calibrated: bool = True
    """Also run VTW at the K its own rule calibrates (first-token KL <= eta; ``calibration`` section)."""
    vtw_answer_calibrated: bool = False
    """Also run VTW at the K our answer-token variant calibrates (mean answer KL <=
    ``calibration.answer_threshold``), next to VTW's rule."""
    lora_vtw: list[int] = field(default_factory=list)
    """Fixed exit layers K run with a gated checkpoint's LoRA adapters on: what distillation alone
    buys at a fixed K (needs ``gated_checkpoint``)."""
    gate: list[float] = field(default_factory=list)
    """Thresholds tau of the learned gate (needs ``gated_checkpoint``; empty with a checkpoint: the
    gate's own tau)."""
    vispruner: list[int] = field(default_factory=list)
    """Tokens T kept per image by VisPruner."""
    vispruner_important_ratio: float = 0.5
    """VisPruner's importance share r (the rest of T is chosen for diversity)."""
    random_tokens: list[int] = field(default_factory=list)
    """The control for VisPruner: T tokens per image kept at random (same budget and plumbing), so the
    table shows what VisPruner's [CLS] ranking adds."""
    vispruner_budget: Literal["reference", "surviving"] = "reference"
    """LLaVA-NeXT crops: T among all of a crop's tokens, then unpadding (``reference``, VisPruner's own
    code: at most T reach the LLM), or T among the tokens unpadding keeps (``surviving``: exactly T)."""
    shortv: list[int] = field(default_factory=list)
    """Numbers N of frozen layers (Layer Contribution is measured first)."""
    fastv: list[FastVSetting] = field(default_factory=list)
    """FastV (layer, keep_ratio) pairs."""
    vispruner_vtw: list[PrunedExit] = field(default_factory=list)
    """VisPruner then VTW (docs/methods.md §10)."""
    vispruner_gate: list[PrunedGate] = field(default_factory=list)
    """VisPruner then the gate."""
    shortv_vtw: list[ShortVExit] = field(default_factory=list)
    """ShortV below K, then VTW at K."""
    fastv_vtw: list[FastVExit] = field(default_factory=list)
    """FastV, then VTW at K."""
    fastv_gate: list[FastVGate] = field(default_factory=list)
    """FastV, then the gate (needs ``gated_checkpoint``)."""

    @property
    def needs_shortv(self) -> bool:
        """Whether Layer Contribution must be measured before the run."""
        return bool(self.shortv or self.shortv_vtw)

    @property
    def needs_gate(self) -> bool:
        return bool(self.gate or self.vispruner_gate or self.fastv_gate)


@dataclass(frozen=True, eq=False)
class Strategy:
    """A named way to run the model: one :class:`~vtw_train.engine.Reduction`, with or without the LoRA adapters.

    ``method`` is the family label reports and plots group by (:data:`FAMILIES`); ``settings``
    are the knobs that are on, as primitives, for reports and JSON. ``adapters`` runs the
    strategy with a gated checkpoint's LoRA adapters on (the gate, and "LoRA + fixed K");
    everything else runs on the base model.
    """

    name: str
    method: str
    reduction: Reduction = FULL
    adapters: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def withdraws(self) -> bool:
        """Whether the engine records an exit layer per sample that the FLOPs model should use."""
        return self.reduction.withdraws


def _check_int(value: Any, key: str, low: int, high: int | None, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: {what} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{key}: {what} must be in {bound}, got {value}")
    return value


def _check_unit(value: Any, key: str, what: str, *, open_low: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{key}: {what} must be a number, got {value!r}")
    low_ok = value > 0 if open_low else value >= 0
    if not low_ok or value > 1:
        raise ValueError(f"{key}: {what} must be in {'(0' if open_low else '[0'}, 1], got {value}")
    return float(value)


def expand_strategies(
    sweep: StrategySweep,
    num_layers: int,
    *,
    calibrated_exit_layer: int | None = None,
    answer_calibrated_exit_layer: int | None = None,
    gate: ExitGate | None = None,
    shortv: ShortVRecord | None = None,
    lora: bool = False,
) -> list[Strategy]:
    """The full model first, then every family in :data:`FAMILIES` order, each with its reduction built.

    ``calibrated_exit_layer`` is the K found by calibration (required when
    ``sweep.vtw_calibrated``); ``gate`` is the loaded exit gate (None: no gated checkpoint; its
    own tau is used when ``sweep.gate`` is empty); ``shortv`` is the Layer Contribution record
    (required by the ShortV strategies); ``lora`` says whether the model carries a gated
    checkpoint's LoRA adapters (required by ``lora_vtw``).
    Errors name the config key (``strategies.<field>[i]``) and the valid range.
    """
    from ..gate import GateExitRule
    from ..methods import FastV, VisPruner

    layers = num_layers
    out: list[Strategy] = [Strategy("full", "full")]
    ratio = _check_unit(
        sweep.vispruner_important_ratio,
        "strategies.vispruner_important_ratio",
        "the importance share",
        open_low=False,
    )
    if sweep.needs_gate and gate is None:
        key = next(k for k in ("gate", "vispruner_gate", "fastv_gate") if getattr(sweep, k))
        key = f"strategies.{key}"
        raise ValueError(
            f"{key} needs a learned gate: set gated_checkpoint to a checkpoint exported by `vtw-train train`"
        )
    if sweep.lora_vtw and not lora:
        raise ValueError(
            "strategies.lora_vtw needs LoRA adapters: set gated_checkpoint to a checkpoint exported by `vtw-train train`"
        )
    if sweep.needs_shortv and shortv is None:
        key = "strategies.shortv" if sweep.shortv else "strategies.shortv_vtw"
        raise ValueError(f"{key} needs ShortV's Layer Contribution record (measured by the harness first)")

    def exit_k(value: Any, key: str) -> int:
        return _check_int(value, key, 0, layers, f"the exit layer K (this model has {layers} decoder layers)")

    def tokens(value: Any, key: str) -> int:
        return _check_int(value, key, 1, None, "VisPruner's kept tokens T")

    def tau(value: Any, key: str) -> float:
        return _check_unit(value, key, "the gate threshold tau", open_low=True)

    def frozen(n: int, below: int | None = None) -> frozenset[int]:
        # Composed with VTW, only ShortV's layers before the exit K: the rest see no visual rows.
        assert shortv is not None
        chosen = shortv.frozen_layers(n)
        return chosen if below is None else frozenset(layer for layer in chosen if layer < below)

    def pruner(t: int) -> VisPruner:
        return VisPruner(num_tokens=t, important_ratio=ratio, budget=sweep.vispruner_budget)

    for i, k in enumerate(sweep.vtw):
        k = exit_k(k, f"strategies.vtw[{i}]")
        out.append(Strategy(f"VTW K={k}", "VTW", Reduction(exit_layer=k), settings={"exit_layer": k}))
    if sweep.vtw_calibrated:
        if calibrated_exit_layer is None:
            raise ValueError("strategies.vtw_calibrated is true but no calibrated K was given")
        k = exit_k(calibrated_exit_layer, "calibration (the calibrated K)")
        out.append(
            Strategy(
                f"VTW calibrated K={k}", "VTW calibrated", Reduction(exit_layer=k), settings={"exit_layer": k}
            )
        )
    if sweep.vtw_answer_calibrated:
        if answer_calibrated_exit_layer is None:
            raise ValueError(
                "strategies.vtw_answer_calibrated is true but no answer-KL calibrated K was given"
            )
        k = exit_k(answer_calibrated_exit_layer, "calibration (the answer-KL calibrated K)")
        out.append(
            Strategy(
                f"VTW answer-KL K={k}", "VTW answer-KL", Reduction(exit_layer=k), settings={"exit_layer": k}
            )
        )
    for i, k in enumerate(sweep.lora_vtw):
        k = exit_k(k, f"strategies.lora_vtw[{i}]")
        out.append(
            Strategy(
                f"LoRA + VTW K={k}",
                "LoRA+VTW",
                Reduction(exit_layer=k),
                adapters=True,
                settings={"exit_layer": k},
            )
        )
    if gate is not None:
        for i, t in enumerate(sweep.gate or [float(gate.config.tau)]):
            t = tau(t, f"strategies.gate[{i}]")
            rule = GateExitRule(gate, tau=t)
            out.append(
                Strategy(
                    f"gate tau={t:g}",
                    "gate",
                    Reduction(exit_rule=rule),
                    adapters=True,
                    settings={"gate_tau": t},
                )
            )
    for i, t in enumerate(sweep.vispruner):
        t = tokens(t, f"strategies.vispruner[{i}]")
        out.append(
            Strategy(
                f"VisPruner T={t}",
                "VisPruner",
                Reduction(input_pruner=pruner(t)),
                settings={"vispruner_tokens": t, "important_ratio": ratio},
            )
        )
    for i, t in enumerate(sweep.random_tokens):
        t = tokens(t, f"strategies.random_tokens[{i}]")
        control = VisPruner(num_tokens=t, budget=sweep.vispruner_budget, ranking="random", seed=i)
        out.append(
            Strategy(
                f"random T={t} (control)",
                "random tokens",
                Reduction(input_pruner=control),
                settings={"random_tokens": t},
            )
        )
    for i, n in enumerate(sweep.shortv):
        n = _check_int(n, f"strategies.shortv[{i}]", 0, layers, "ShortV's frozen layer count N")
        layers_n = frozen(n)
        out.append(
            Strategy(
                f"ShortV N={n}",
                "ShortV",
                Reduction(frozen_layers=layers_n),
                settings={"shortv_layers": n, "frozen_layers": sorted(layers_n)},
            )
        )
    for i, f in enumerate(sweep.fastv):
        key = f"strategies.fastv[{i}]"
        k = _check_int(f.layer, f"{key}.layer", 1, layers - 1, "FastV's layer K")
        keep = _check_unit(f.keep_ratio, f"{key}.keep_ratio", "FastV's keep ratio", open_low=False)
        out.append(
            Strategy(
                f"FastV K={k} keep={keep:g}",
                "FastV",
                Reduction(pruning=FastV(layer=k, keep_ratio=keep)),
                settings={"fastv_layer": k, "fastv_keep_ratio": keep},
            )
        )
    for i, c in enumerate(sweep.vispruner_vtw):
        key = f"strategies.vispruner_vtw[{i}]"
        t, k = tokens(c.tokens, f"{key}.tokens"), exit_k(c.exit_layer, f"{key}.exit_layer")
        out.append(
            Strategy(
                f"VisPruner T={t} + VTW K={k}",
                "VisPruner+VTW",
                Reduction(exit_layer=k, input_pruner=pruner(t)),
                settings={"exit_layer": k, "vispruner_tokens": t, "important_ratio": ratio},
            )
        )
    for i, c in enumerate(sweep.vispruner_gate):
        key = f"strategies.vispruner_gate[{i}]"
        t, g = tokens(c.tokens, f"{key}.tokens"), tau(c.tau, f"{key}.tau")
        assert gate is not None
        out.append(
            Strategy(
                f"VisPruner T={t} + gate tau={g:g}",
                "VisPruner+gate",
                Reduction(exit_rule=GateExitRule(gate, tau=g), input_pruner=pruner(t)),
                adapters=True,
                settings={"gate_tau": g, "vispruner_tokens": t, "important_ratio": ratio},
            )
        )
    for i, c in enumerate(sweep.shortv_vtw):
        key = f"strategies.shortv_vtw[{i}]"
        n = _check_int(c.frozen, f"{key}.frozen", 0, layers, "ShortV's frozen layer count N")
        k = exit_k(c.exit_layer, f"{key}.exit_layer")
        layers_n = frozen(n, below=k)
        out.append(
            Strategy(
                f"ShortV N={n} + VTW K={k}",
                "ShortV+VTW",
                Reduction(exit_layer=k, frozen_layers=layers_n),
                settings={"exit_layer": k, "shortv_layers": n, "frozen_layers": sorted(layers_n)},
            )
        )
    for i, c in enumerate(sweep.fastv_vtw):
        key = f"strategies.fastv_vtw[{i}]"
        f_k = _check_int(c.layer, f"{key}.layer", 1, layers - 1, "FastV's layer K")
        keep = _check_unit(c.keep_ratio, f"{key}.keep_ratio", "FastV's keep ratio", open_low=False)
        k = exit_k(c.exit_layer, f"{key}.exit_layer")
        out.append(
            Strategy(
                f"FastV K={f_k} keep={keep:g} + VTW K={k}",
                "FastV+VTW",
                Reduction(pruning=FastV(layer=f_k, keep_ratio=keep), exit_layer=k),
                settings={"fastv_layer": f_k, "fastv_keep_ratio": keep, "exit_layer": k},
            )
        )
    for i, c in enumerate(sweep.fastv_gate):
        key = f"strategies.fastv_gate[{i}]"
        f_k = _check_int(c.layer, f"{key}.layer", 1, layers - 1, "FastV's layer K")
        keep = _check_unit(c.keep_ratio, f"{key}.keep_ratio", "FastV's keep ratio", open_low=False)
        g = tau(c.tau, f"{key}.tau")
        assert gate is not None
        out.append(
            Strategy(
                f"FastV K={f_k} keep={keep:g} + gate tau={g:g}",
                "FastV+gate",
                Reduction(pruning=FastV(layer=f_k, keep_ratio=keep), exit_rule=GateExitRule(gate, tau=g)),
                adapters=True,
                settings={"fastv_layer": f_k, "fastv_keep_ratio": keep, "gate_tau": g},
            )
        )
    _check_unique(out)
    return out


def _check_unique(strategies: list[Strategy]) -> None:
    seen: set[str] = set()
    for s in strategies:
        if s.name in seen:
            raise ValueError(
                f"strategy {s.name!r} is listed twice in the strategies section; list each setting once"
            )
        seen.add(s.name)
