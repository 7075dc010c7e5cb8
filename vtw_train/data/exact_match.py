"""Exact-match VQA evaluation by batched greedy generation, reported per question type.

Why here: the eval script, the exit engine's calibration and later training all need
the same definition of "correct" (normalized exact match of a short answer).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vtw_train.data.collate import VLMCollator
from vtw_train.data.records import VQARecord
from vtw_train.data.synthetic import answer_normalize


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


@torch.no_grad()
def evaluate_exact_match(
    model,
    processor,
    records: Sequence[VQARecord],
    batch_size: int = 32,
    max_new_tokens: int = 8,
    image_transform: Callable | None = None,
    generate_kwargs: dict | None = None,
) -> ExactMatchResult:
    """Greedy-generate an answer for each record and score normalized exact match.

    ``image_transform`` (PIL -> PIL, applied per image) supports controls such as replacing
    every image with noise; ``generate_kwargs`` pass through to ``model.generate``.
    """
    collate = VLMCollator(processor, mode="generate")
    tok = getattr(processor, "tokenizer", processor)
    model.eval()
    hits: dict[str, list[int]] = defaultdict(list)
    preds: list[str] = []
    for i in range(0, len(records), batch_size):
        chunk = list(records[i : i + batch_size])
        if image_transform is not None:
            from vtw_train.data.records import load_image

            chunk = [
                VQARecord(
                    r.id,
                    [image_transform(load_image(im)) for im in r.images],
                    r.turns,
                    r.question_type,
                    r.source,
                )
                for r in chunk
            ]
        batch = collate(chunk)
        answers, qtypes = batch.pop("answers"), batch.pop("question_types")
        batch.pop("ids")
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            **(generate_kwargs or {}),
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = tok.batch_decode(new, skip_special_tokens=True)
        for pred, ans, qt in zip(texts, answers, qtypes, strict=True):
            preds.append(pred)
            hits[qt or "all"].append(int(answer_normalize(pred) == answer_normalize(ans)))
    per_type = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    n = sum(len(v) for v in hits.values())
    overall = sum(sum(v) for v in hits.values()) / max(1, n)
    return ExactMatchResult(overall, per_type, {t: len(v) for t, v in hits.items()}, preds)


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
