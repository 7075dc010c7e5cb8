"""Exact match per question type: the one definition of "correct" (normalized exact match of a short answer)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..data.answers import answer_normalize, is_match
from ..data.collate import VLMCollator
from ..data.records import VQARecord
from ..engine import FULL, Reduction
from .loop import generate_answers


@dataclass
class ExactMatchResult:
    overall: float
    per_type: dict[str, float]
    counts: dict[str, int]
    predictions: list[str] = field(default_factory=list)

    def table(
        self, baselines: dict[str, float] | None = None, extra: dict[str, dict[str, float]] | None = None
    ) -> str:
        """Plain-text table: type, n, accuracy, optional baseline and extra columns."""
        cols = ["type", "n", "accuracy"] + (["majority"] if baselines else []) + list(extra or {})
        rows = []
        for t in [*sorted(self.per_type), "overall"]:
            acc = self.overall if t == "overall" else self.per_type[t]
            n = sum(self.counts.values()) if t == "overall" else self.counts[t]
            row = [t, str(n), f"{acc:.3f}"]
            if baselines:
                row.append(f"{baselines.get(t, float('nan')):.3f}")
            for col in extra or {}:
                row.append(f"{extra[col].get(t, float('nan')):.3f}")
            rows.append(row)
        widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        return "\n".join(fmt.format(*r) for r in [cols, *rows])


def majority_baseline(records: Sequence[VQARecord]) -> dict[str, float]:
    """Accuracy of always answering each type's most common answer (computed on ``records``)."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        by_type[r.question_type or "all"][answer_normalize(r.answer)] += 1
    out = {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in by_type.items()}
    out["overall"] = sum(c.most_common(1)[0][1] for c in by_type.values()) / max(1, len(records))
    return out


def score_answers(records: Sequence[VQARecord], predictions: Sequence[str]) -> ExactMatchResult:
    """Normalized exact match of ``predictions`` against the records' answers, overall and per question type."""
    hits: dict[str, list[int]] = defaultdict(list)
    for record, pred in zip(records, predictions, strict=True):
        hits[record.question_type or "all"].append(int(is_match(pred, record.answer)))
    per_type = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    n = sum(len(v) for v in hits.values())
    overall = sum(sum(v) for v in hits.values()) / max(1, n)
    return ExactMatchResult(overall, per_type, {t: len(v) for t, v in hits.items()}, list(predictions))


def evaluate_exact_match(
    model,
    processor,
    records: Sequence[VQARecord],
    batch_size: int = 32,
    max_new_tokens: int = 8,
    image_transform: Callable | None = None,
    reduction: Reduction = FULL,
    progress: Callable[[int], None] | None = None,
) -> ExactMatchResult:
    """Greedy answers under ``reduction`` (default: the full model), scored by normalized exact match.

    ``image_transform`` (PIL -> PIL, applied per image) supports controls such as replacing
    every image with noise.
    """
    answers = generate_answers(
        model,
        processor,
        records,
        reduction,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        image_transform=image_transform,
        progress=progress,
    )
    return score_answers(records, answers.predictions)


def visual_token_share(processor, image_token_id: int, records: Sequence[VQARecord]) -> dict[str, float]:
    """How much of each generation prompt is visual tokens (VTW saves little unless it is most)."""
    batch = VLMCollator(processor, mode="generate")(list(records))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n_vis = (ids == image_token_id).sum(dim=1).float()
    n_all = mask.sum(dim=1).float()
    share = n_vis / n_all
    return {
        "visual_tokens": int(n_vis.max()),
        "max_prompt_tokens": int(n_all.max()),
        "min_share": float(share.min()),
        "mean_share": float(share.mean()),
    }
