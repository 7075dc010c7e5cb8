"""What a harness run measured, per strategy and per question type, and the budget verdict.

One place defines the numbers so that the JSON, the CSV, the Markdown, the plot and W&B can
only ever disagree in formatting, never in value.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..data.answers import answer_normalize

#: Question type used for records that carry none.
UNTYPED = "all"


@dataclass
class GroupStats:
    """Accuracy, agreement with the full model and FLOPs ratio over one group of samples."""

    n: int
    accuracy: float
    agreement: float
    flops_ratio: float


@dataclass
class StrategyResult:
    """One strategy over all evaluated samples, plus its prefill measurements on the timing batch.

    accuracy: normalized exact match with the reference answers.
    agreement: share of samples whose normalized answer equals the full model's.
    flops_ratio: mean over samples of LM prefill FLOPs / the full model's on the same prompt.
    time_ratio: median prefill seconds / the full model's, same batch, interleaved (NaN: not timed).
    kv_bytes: KV-cache bytes after prefilling the timing batch.
    mean_exit_layer: mean K over samples for strategies that withdraw (never exited counts as L).
    mean_visual_in: mean visual tokens entering the language model, for strategies that prune before
        it (VisPruner: at most T per image; on LLaVA-NeXT with the reference budget, fewer).
    """

    name: str
    method: str
    settings: dict[str, Any]
    n: int
    accuracy: float
    agreement: float
    flops_ratio: float
    prefill_seconds: float
    time_ratio: float
    kv_bytes: int
    kv_ratio: float
    peak_memory_bytes: int | None
    mean_exit_layer: float | None
    per_type: dict[str, GroupStats] = field(default_factory=dict)
    predictions: list[str] = field(default_factory=list, repr=False)
    mean_visual_in: float | None = None


@dataclass
class HarnessResult:
    """Every strategy's result, in run order; ``strategies[0]`` is the full model (the reference)."""

    strategies: list[StrategyResult]
    num_layers: int
    num_samples: int
    question_types: dict[str, int]
    timing_batch_size: int
    calibration: dict[str, Any] | None = None
    shortv: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def full(self) -> StrategyResult:
        return self.strategies[0]

    def by_name(self, name: str) -> StrategyResult:
        for s in self.strategies:
            if s.name == name:
                return s
        raise KeyError(f"no strategy named {name!r}; have {[s.name for s in self.strategies]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes null); predictions stay out (they go to predictions.jsonl)."""
        data = asdict(self)
        for s in data["strategies"]:
            s.pop("predictions")
        return _nan_to_none(data)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def group_stats(
    predictions: Sequence[str],
    reference: Sequence[str],
    answers: Sequence[str],
    question_types: Sequence[str | None],
    flops_ratios: Sequence[float],
) -> tuple[GroupStats, dict[str, GroupStats]]:
    """Overall and per-question-type stats; the per-type numbers average back to the overall ones by count."""
    rows: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    for pred, ref, ans, qt, ratio in zip(
        predictions, reference, answers, question_types, flops_ratios, strict=True
    ):
        norm = answer_normalize(pred)
        rows[qt or UNTYPED].append(
            (int(norm == answer_normalize(ans)), int(norm == answer_normalize(ref)), ratio)
        )

    def stats(items: list[tuple[int, int, float]]) -> GroupStats:
        n = len(items)
        if n == 0:
            return GroupStats(0, math.nan, math.nan, math.nan)
        return GroupStats(
            n,
            sum(i[0] for i in items) / n,
            sum(i[1] for i in items) / n,
            sum(i[2] for i in items) / n,
        )

    overall = stats([item for items in rows.values() for item in items])
    return overall, {t: stats(items) for t, items in sorted(rows.items())}


@dataclass
class BudgetVerdict:
    """The best strategy within a FLOPs budget, and where each family's best falls."""

    budget: float
    best: StrategyResult | None
    full_accuracy: float
    per_family: dict[str, StrategyResult | None]
    cheapest: dict[str, StrategyResult]

    def relative(self, result: StrategyResult) -> float:
        """Accuracy as a share of the full model's (NaN when the full model scores 0)."""
        return result.accuracy / self.full_accuracy if self.full_accuracy > 0 else math.nan


def budget_verdict(result: HarnessResult, budget: float) -> BudgetVerdict:
    """Among strategies with FLOPs ratio <= ``budget`` (full model excluded): the most accurate.

    Ties go to the cheaper strategy. Families with no setting inside the budget are listed
    with their cheapest setting instead.
    """
    others = [s for s in result.strategies[1:] if s.flops_ratio <= budget + 1e-12]

    def best_of(items: list[StrategyResult]) -> StrategyResult | None:
        return max(items, key=lambda s: (s.accuracy, -s.flops_ratio)) if items else None

    inside = {id(s) for s in others}
    families: dict[str, list[StrategyResult]] = defaultdict(list)
    for s in result.strategies[1:]:
        families[s.method].append(s)
    return BudgetVerdict(
        budget=budget,
        best=best_of(others),
        full_accuracy=result.full.accuracy,
        per_family={m: best_of([s for s in items if id(s) in inside]) for m, items in families.items()},
        cheapest={m: min(items, key=lambda s: s.flops_ratio) for m, items in families.items()},
    )
