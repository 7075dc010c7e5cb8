"""The main job's comparison: the full model, training-free VTW, LoRA at the same K, and the gate.

It is a preset of the one evaluation loop (:mod:`vtw_train.evaluation.loop`): each row is a
:class:`~vtw_train.evaluation.strategies.Strategy`, run on the same records, with exact-match
accuracy and the language-model FLOPs it spent per sample. :func:`gate_verdicts` then says
whether the gate beats each fixed K at equal accuracy and at equal FLOPs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from ..adapters import has_adapters
from ..data.records import VQARecord
from ..engine import Reduction, attach
from ..gate import ExitGate, GateExitRule
from .loop import run_strategy
from .scoring import score_answers
from .strategies import Strategy

#: How :func:`gate_verdicts` treats a row: the reference, a fixed exit layer, or a gate threshold.
PolicyRole = Literal["full", "fixed_k", "gate", "other"]


@dataclass
class PolicyResult:
    """One policy's row. ``role`` ("full", "fixed_k" or "gate") is what :func:`gate_verdicts`
    compares by, so display names can change freely."""

    name: str
    accuracy: float
    per_type: dict[str, float]
    flops_ratio: float
    mean_exit_layer: float
    exit_histogram: dict[int, int] = field(default_factory=dict)
    predictions: list[str] = field(default_factory=list)
    role: PolicyRole = "other"
    mean_text_tokens: float = 0.0


def policy_strategies(
    model: nn.Module, gate: ExitGate | None, fixed_exit_layer: int | None, taus: Sequence[float] = ()
) -> list[tuple[Strategy, PolicyRole]]:
    """The main job's rows: full model and fixed-K VTW on the base weights (adapters off); LoRA at the
    same K and the gate at each tau with the adapters on."""
    rows: list[tuple[Strategy, PolicyRole]] = [(Strategy("full model", "full"), "full")]
    if fixed_exit_layer is not None:
        k = fixed_exit_layer
        rows.append((Strategy(f"VTW fixed K={k}", "VTW calibrated", Reduction(exit_layer=k)), "fixed_k"))
        if has_adapters(model):  # what distillation alone buys at the same K
            rows.append(
                (
                    Strategy(f"LoRA + fixed K={k}", "LoRA+VTW", Reduction(exit_layer=k), adapters=True),
                    "fixed_k",
                )
            )
    if gate is not None:
        for tau in taus or [gate.config.tau]:
            rule = GateExitRule(gate, tau=tau)
            rows.append(
                (Strategy(f"gate tau={tau:g}", "gate", Reduction(exit_rule=rule), adapters=True), "gate")
            )
    return rows


def compare_policies(
    model: nn.Module,
    processor: Any,
    records: Sequence[VQARecord],
    gate: ExitGate | None,
    fixed_exit_layer: int | None,
    taus: Sequence[float] = (),
    batch_size: int = 32,
    max_new_tokens: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[PolicyResult]:
    """Every row of :func:`policy_strategies` on ``records``, in order."""
    num_layers = attach(model).num_layers
    results = []
    for strategy, role in policy_strategies(model, gate, fixed_exit_layer, taus):
        answers = run_strategy(
            model,
            processor,
            records,
            strategy,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
        scored = score_answers(records, answers.predictions)
        exits = [num_layers if k is None else k for k in answers.exit_layers]
        n = max(1, len(exits))
        results.append(
            PolicyResult(
                name=strategy.name,
                accuracy=scored.overall,
                per_type=scored.per_type,
                flops_ratio=sum(answers.flops_ratios) / n,
                mean_exit_layer=sum(exits) / n,
                exit_histogram=dict(sorted(Counter(exits).items())),
                predictions=scored.predictions,
                role=role,
                mean_text_tokens=answers.mean_text_tokens,
            )
        )
    return results


@dataclass
class GateVerdict:
    """The gate against one fixed-K policy, in the two senses the project is judged by.

    ``same_accuracy``: the cheapest gate threshold whose accuracy is within ``tolerance`` of
    the fixed K's, and the fraction of the fixed K's FLOPs it saves (target >= 25%).
    ``same_flops``: the most accurate gate threshold that spends no more FLOPs than the fixed K,
    and its accuracy gain (target > 0). None where no threshold qualifies.
    """

    baseline: str
    same_accuracy: str | None
    flops_saving: float | None
    same_flops: str | None
    accuracy_gain: float | None
    tolerance: float = 0.005

    def line(self) -> str:
        within = f"within {self.tolerance * 100:.1f} points"
        if not self.same_accuracy:
            a = f"no gate threshold reaches its accuracy ({within})"
        elif self.flops_saving is not None and self.flops_saving >= 0:
            a = f"{self.same_accuracy} matches its accuracy ({within}) with {self.flops_saving:.1%} fewer FLOPs"
        else:
            a = f"{self.same_accuracy} matches its accuracy ({within}) but costs {-self.flops_saving:.1%} more FLOPs"
        b = (
            f"{self.same_flops} is {self.accuracy_gain * 100:+.1f} pt at no more FLOPs"
            if self.same_flops
            else "no gate threshold is as cheap"
        )
        return f"vs {self.baseline}: {a}; {b}"


def gate_verdicts(results: Sequence[PolicyResult], tolerance: float = 0.005) -> list[GateVerdict]:
    """Compare every gate row with every fixed-K row (training-free VTW and LoRA at the same K)."""
    gates = [r for r in results if r.role == "gate"]
    out = []
    for base in (r for r in results if r.role == "fixed_k"):
        close = [g for g in gates if g.accuracy >= base.accuracy - tolerance]
        cheap = [g for g in gates if g.flops_ratio <= base.flops_ratio + 1e-9]
        best_a = min(close, key=lambda g: g.flops_ratio, default=None)
        best_f = max(cheap, key=lambda g: (g.accuracy, -g.flops_ratio), default=None)
        out.append(
            GateVerdict(
                baseline=base.name,
                same_accuracy=best_a.name if best_a else None,
                flops_saving=1 - best_a.flops_ratio / base.flops_ratio if best_a else None,
                same_flops=best_f.name if best_f else None,
                accuracy_gain=best_f.accuracy - base.accuracy if best_f else None,
                tolerance=tolerance,
            )
        )
    return out


def format_results(results: Sequence[PolicyResult]) -> str:
    """The comparison as a plain-text table, with what each column means underneath."""
    types = sorted({t for r in results for t in r.per_type})
    per_type = "exact match per question type" if types else ""
    header1 = f"{'':<22}{'exact':>9}{'FLOPs':>8}{'mean':>8}  {per_type}"
    header2 = f"{'policy':<22}{'match':>9}{'ratio':>8}{'exit K':>8}  " + "  ".join(
        f"{t[:9]:>9}" for t in types
    )
    lines = [header1.rstrip(), header2.rstrip()]
    for r in results:
        per = "  ".join(f"{r.per_type.get(t, float('nan')):>9.3f}" for t in types)
        lines.append(f"{r.name:<22}{r.accuracy:>9.3f}{r.flops_ratio:>8.3f}{r.mean_exit_layer:>8.2f}  {per}")
    text = results[0].mean_text_tokens if results else 0.0
    lines.append(
        "FLOPs ratio: language-model prefill FLOPs over the full model's on the same prompt, mean over samples, "
        f"each at its own text length ({text:.1f} text tokens on average). mean exit K: the layer after which "
        "visual tokens were withdrawn (the decoder depth: never)."
    )
    return "\n".join(lines)
