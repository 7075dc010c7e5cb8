"""Accuracy and compute of exit policies, measured side by side on the same records.

The comparison the project is judged on: the full model, training-free VTW at the calibrated
K, and the learned gate (at one or more thresholds), each with exact-match accuracy and the
language-model FLOPs it spent per sample.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .data.exact_match import evaluate_exact_match
from .data.records import VQARecord
from .distill import sample_flops_ratios
from .engine import attach
from .gate import ExitGate, GateExitRule

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


class _RecordingModel:
    """Wraps ``generate`` to record, per sample, the exit layer and the FLOPs it implied."""

    def __init__(self, model: nn.Module, progress: Any = None) -> None:
        self.model = model
        self.progress = progress
        self.controller = attach(model)
        self.exits: list[int] = []
        self.ratios: list[float] = []

    def eval(self) -> _RecordingModel:
        self.model.eval()
        return self

    def generate(self, **kwargs: Any) -> torch.Tensor:
        self.controller.last_exit_layers = None
        out = self.model.generate(**kwargs)
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        num_layers = self.controller.num_layers
        exits = self.controller.last_exit_layers
        if exits is None:
            exits = torch.full((ids.shape[0],), num_layers, dtype=torch.long)
        visual = torch.isin(ids, torch.tensor(self.controller.visual_token_ids, device=ids.device))
        config = self.controller.language_model.config
        for row, k in enumerate(exits.tolist()):
            ratio = sample_flops_ratios(
                config, visual[row : row + 1], None if mask is None else mask[row : row + 1], [int(k)]
            )
            self.exits.append(int(k))
            self.ratios.append(float(ratio))
        if self.progress is not None:
            self.progress.update(ids.shape[0])
        return out


def evaluate_policy(
    name: str,
    model: nn.Module,
    processor: Any,
    records: Sequence[VQARecord],
    batch_size: int = 32,
    max_new_tokens: int = 8,
    role: PolicyRole = "other",
) -> PolicyResult:
    """Exact match and FLOPs of whatever exit policy ``model``'s controller is set to."""
    recorder = _RecordingModel(model)
    result = evaluate_exact_match(
        recorder, processor, records, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    n = max(1, len(recorder.exits))
    return PolicyResult(
        name=name,
        accuracy=result.overall,
        per_type=result.per_type,
        flops_ratio=sum(recorder.ratios) / n,
        mean_exit_layer=sum(recorder.exits) / n,
        exit_histogram=dict(sorted(Counter(recorder.exits).items())),
        predictions=result.predictions,
        role=role,
    )


def compare_policies(
    model: nn.Module,
    processor: Any,
    records: Sequence[VQARecord],
    gate: ExitGate | None,
    fixed_exit_layer: int | None,
    taus: Sequence[float] = (),
    batch_size: int = 32,
    max_new_tokens: int = 8,
) -> list[PolicyResult]:
    """Full model and fixed-K VTW on the base weights (adapters off); LoRA at the same K and the gate with
    the adapters on."""
    controller = attach(model)
    disable = getattr(model, "disable_adapter", None)
    saved = (controller.exit_layer, controller.dynamic_exit)
    results = []

    def run(name: str, role: PolicyRole) -> None:
        results.append(evaluate_policy(name, model, processor, records, batch_size, max_new_tokens, role))

    try:
        controller.dynamic_exit = None
        with disable() if callable(disable) else nullcontext():
            controller.exit_layer = None
            run("full model", "full")
            if fixed_exit_layer is not None:
                controller.exit_layer = fixed_exit_layer
                run(f"VTW fixed K={fixed_exit_layer}", "fixed_k")
        if fixed_exit_layer is not None and callable(disable):
            controller.exit_layer = fixed_exit_layer  # what distillation alone buys at the same K
            run(f"LoRA + fixed K={fixed_exit_layer}", "fixed_k")
        if gate is not None:
            controller.exit_layer = None
            for tau in taus or [gate.config.tau]:
                controller.dynamic_exit = GateExitRule(gate, tau=tau)
                run(f"gate tau={tau:g}", "gate")
    finally:
        controller.exit_layer, controller.dynamic_exit = saved
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

    def line(self) -> str:
        a = (
            f"{self.same_accuracy} saves {self.flops_saving:.1%} of its FLOPs at its accuracy (within tolerance)"
            if self.same_accuracy
            else "no gate threshold reaches its accuracy"
        )
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
            )
        )
    return out


def format_results(results: Sequence[PolicyResult]) -> str:
    types = sorted({t for r in results for t in r.per_type})
    header = f"{'policy':<22}{'accuracy':>9}{'FLOPs':>8}{'mean K':>8}  " + "  ".join(
        f"{t[:9]:>9}" for t in types
    )
    lines = [header]
    for r in results:
        per = "  ".join(f"{r.per_type.get(t, float('nan')):>9.3f}" for t in types)
        lines.append(f"{r.name:<22}{r.accuracy:>9.3f}{r.flops_ratio:>8.3f}{r.mean_exit_layer:>8.2f}  {per}")
    return "\n".join(lines)
