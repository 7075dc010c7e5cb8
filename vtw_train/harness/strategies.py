"""Which strategies a harness run compares, as a typed sweep, and their expansion into a flat list.

Why a sweep and not a free-form list: every method has one or two knobs (VTW's K, VisPruner's
T, ...), and a side-by-side comparison wants a handful of values per knob. A sweep per family
keeps the YAML short, and jsonargparse checks every key and type against these dataclasses.
:func:`expand_strategies` turns the sweep into named :class:`Strategy` objects, checking the
values that depend on the model (its depth) and naming the offending config key on error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FAMILIES",
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
    "gate",
    "VisPruner",
    "ShortV",
    "FastV",
    "VisPruner+VTW",
    "VisPruner+gate",
    "ShortV+VTW",
)


@dataclass
class FastVSetting:
    """FastV at layer K (>= 1), keeping ``keep_ratio`` of each sample's visual tokens."""

    layer: int
    keep_ratio: float = 0.5


@dataclass
class PrunedExit:
    """VisPruner to T tokens per image, then VTW withdraws the kept ones before layer K."""

    tokens: int
    exit_layer: int


@dataclass
class PrunedGate:
    """VisPruner to T tokens per image, then the learned gate decides when to withdraw them."""

    tokens: int
    tau: float


@dataclass
class ShortVExit:
    """ShortV's N least-contributing layers, frozen only below the exit K, then VTW at K."""

    frozen: int
    exit_layer: int


@dataclass
class StrategySweep:
    """The strategies to compare; the full model always runs (it is every ratio's reference).

    vtw: fixed exit layers K for training-free VTW.
    vtw_calibrated: also run VTW at the K chosen by KL calibration (``calibration`` section).
    gate: thresholds tau of the learned gate (needs ``gated_checkpoint``; empty with a
        checkpoint: the gate's own tau).
    vispruner: tokens T kept per image; ``vispruner_important_ratio`` is its importance share.
    shortv: numbers N of frozen layers (Layer Contribution is measured first).
    fastv: (layer, keep_ratio) pairs.
    vispruner_vtw / vispruner_gate / shortv_vtw: compositions (METHODS.md §10).
    """

    vtw: list[int] = field(default_factory=list)
    vtw_calibrated: bool = True
    gate: list[float] = field(default_factory=list)
    vispruner: list[int] = field(default_factory=list)
    vispruner_important_ratio: float = 0.5
    shortv: list[int] = field(default_factory=list)
    fastv: list[FastVSetting] = field(default_factory=list)
    vispruner_vtw: list[PrunedExit] = field(default_factory=list)
    vispruner_gate: list[PrunedGate] = field(default_factory=list)
    shortv_vtw: list[ShortVExit] = field(default_factory=list)

    @property
    def needs_shortv(self) -> bool:
        """Whether Layer Contribution must be measured before the run."""
        return bool(self.shortv or self.shortv_vtw)

    @property
    def needs_gate(self) -> bool:
        return bool(self.gate or self.vispruner_gate)


@dataclass(frozen=True)
class Strategy:
    """One configuration of the engine and the pre-LLM pruner, with a unique name and a family.

    Fields left ``None`` are off. Several may be set at once for compositions; which
    combinations are legal is decided by :func:`expand_strategies`, not here.
    """

    name: str
    method: str
    exit_layer: int | None = None
    gate_tau: float | None = None
    vispruner_tokens: int | None = None
    important_ratio: float = 0.5
    shortv_layers: int | None = None
    fastv_layer: int | None = None
    fastv_keep_ratio: float | None = None

    @property
    def uses_gate(self) -> bool:
        """Gate strategies run with the checkpoint's LoRA adapters on; all others on the base model."""
        return self.gate_tau is not None

    @property
    def withdraws(self) -> bool:
        """Whether the engine records an exit layer per sample that the FLOPs model should use."""
        return self.exit_layer is not None or self.uses_gate

    def settings(self) -> dict[str, Any]:
        """The knobs that are on, for reports and JSON."""
        keys = (
            "exit_layer",
            "gate_tau",
            "vispruner_tokens",
            "shortv_layers",
            "fastv_layer",
            "fastv_keep_ratio",
        )
        out: dict[str, Any] = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if self.vispruner_tokens is not None:
            out["important_ratio"] = self.important_ratio
        return out


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
    gate_tau: float | None = None,
) -> list[Strategy]:
    """The full model first, then every family in :data:`FAMILIES` order.

    ``calibrated_exit_layer`` is the K found by calibration (required when
    ``sweep.vtw_calibrated``); ``gate_tau`` is the loaded gate's own threshold (None: no
    gated checkpoint), used when ``sweep.gate`` is empty.
    Errors name the config key (``strategies.<field>[i]``) and the valid range.
    """
    layers = num_layers
    out: list[Strategy] = [Strategy("full", "full")]
    ratio = _check_unit(
        sweep.vispruner_important_ratio,
        "strategies.vispruner_important_ratio",
        "the importance share",
        open_low=False,
    )
    has_gate = gate_tau is not None
    if sweep.needs_gate and not has_gate:
        key = "strategies.gate" if sweep.gate else "strategies.vispruner_gate"
        raise ValueError(
            f"{key} needs a learned gate: set gated_checkpoint to a checkpoint exported by train_gate.py"
        )

    def exit_k(value: Any, key: str) -> int:
        return _check_int(value, key, 0, layers, f"the exit layer K (this model has {layers} decoder layers)")

    def tokens(value: Any, key: str) -> int:
        return _check_int(value, key, 1, None, "VisPruner's kept tokens T")

    def tau(value: Any, key: str) -> float:
        return _check_unit(value, key, "the gate threshold tau", open_low=True)

    for i, k in enumerate(sweep.vtw):
        k = exit_k(k, f"strategies.vtw[{i}]")
        out.append(Strategy(f"VTW K={k}", "VTW", exit_layer=k))
    if sweep.vtw_calibrated:
        if calibrated_exit_layer is None:
            raise ValueError("strategies.vtw_calibrated is true but no calibrated K was given")
        k = exit_k(calibrated_exit_layer, "calibration (the calibrated K)")
        out.append(Strategy(f"VTW calibrated K={k}", "VTW calibrated", exit_layer=k))
    if has_gate:
        for i, t in enumerate(sweep.gate or [gate_tau]):
            t = tau(t, f"strategies.gate[{i}]")
            out.append(Strategy(f"gate tau={t:g}", "gate", gate_tau=t))
    for i, t in enumerate(sweep.vispruner):
        t = tokens(t, f"strategies.vispruner[{i}]")
        out.append(Strategy(f"VisPruner T={t}", "VisPruner", vispruner_tokens=t, important_ratio=ratio))
    for i, n in enumerate(sweep.shortv):
        n = _check_int(n, f"strategies.shortv[{i}]", 0, layers, "ShortV's frozen layer count N")
        out.append(Strategy(f"ShortV N={n}", "ShortV", shortv_layers=n))
    for i, f in enumerate(sweep.fastv):
        key = f"strategies.fastv[{i}]"
        k = _check_int(f.layer, f"{key}.layer", 1, layers - 1, "FastV's layer K")
        keep = _check_unit(f.keep_ratio, f"{key}.keep_ratio", "FastV's keep ratio", open_low=False)
        out.append(Strategy(f"FastV K={k} keep={keep:g}", "FastV", fastv_layer=k, fastv_keep_ratio=keep))
    for i, c in enumerate(sweep.vispruner_vtw):
        key = f"strategies.vispruner_vtw[{i}]"
        t, k = tokens(c.tokens, f"{key}.tokens"), exit_k(c.exit_layer, f"{key}.exit_layer")
        out.append(
            Strategy(
                f"VisPruner T={t} + VTW K={k}",
                "VisPruner+VTW",
                exit_layer=k,
                vispruner_tokens=t,
                important_ratio=ratio,
            )
        )
    for i, c in enumerate(sweep.vispruner_gate):
        key = f"strategies.vispruner_gate[{i}]"
        t, g = tokens(c.tokens, f"{key}.tokens"), tau(c.tau, f"{key}.tau")
        out.append(
            Strategy(
                f"VisPruner T={t} + gate tau={g:g}",
                "VisPruner+gate",
                gate_tau=g,
                vispruner_tokens=t,
                important_ratio=ratio,
            )
        )
    for i, c in enumerate(sweep.shortv_vtw):
        key = f"strategies.shortv_vtw[{i}]"
        n = _check_int(c.frozen, f"{key}.frozen", 0, layers, "ShortV's frozen layer count N")
        k = exit_k(c.exit_layer, f"{key}.exit_layer")
        out.append(Strategy(f"ShortV N={n} + VTW K={k}", "ShortV+VTW", exit_layer=k, shortv_layers=n))
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
