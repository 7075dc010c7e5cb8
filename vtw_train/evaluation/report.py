"""Write a harness result as results.json, results.csv, predictions.jsonl and summary.md, and phrase the verdict.

All files are written from :class:`~vtw_train.evaluation.results.HarnessResult` alone, so they
agree by construction; the CSV has one ``overall`` row per strategy plus one row per question type.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.records import VQARecord
from .results import BudgetVerdict, HarnessResult, StrategyResult, budget_verdict

OVERALL = "overall"
CSV_COLUMNS = (
    "strategy",
    "method",
    "question_type",
    "n",
    "accuracy",
    "agreement",
    "flops_ratio",
    "prefill_ms",
    "time_ratio",
    "kv_bytes",
    "kv_ratio",
    "peak_memory_bytes",
    "mean_exit_layer",
    "mean_visual_in",
    "settings",
)
#: The CSV's per-question-type columns (the rest are batch-level and stay empty there).
PER_TYPE_COLUMNS = CSV_COLUMNS[:7]
STRATEGY_TABLE_COLUMNS = (
    "strategy",
    "method",
    "accuracy",
    "agreement",
    "flops_ratio",
    "time_ratio",
    "kv_bytes",
)


def _lengths(meta: dict[str, Any]) -> str:
    if "mean_text_tokens" not in meta:
        return ""
    return f" (here {meta['mean_text_tokens']:.1f} text and {meta['mean_visual_tokens']:.1f} visual tokens on average)"


def _num(value: float | None, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, fmt)


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.2f}"


def csv_rows(result: HarnessResult) -> list[dict[str, Any]]:
    """One ``overall`` row per strategy, then its per-question-type rows (batch-level columns empty)."""
    rows: list[dict[str, Any]] = []
    for s in result.strategies:
        rows.append(
            {
                "strategy": s.name,
                "method": s.method,
                "question_type": OVERALL,
                "n": s.n,
                "accuracy": s.accuracy,
                "agreement": s.agreement,
                "flops_ratio": s.flops_ratio,
                "prefill_ms": "" if math.isnan(s.prefill_seconds) else s.prefill_seconds * 1e3,
                "time_ratio": "" if math.isnan(s.time_ratio) else s.time_ratio,
                "kv_bytes": s.kv_bytes,
                "kv_ratio": "" if math.isnan(s.kv_ratio) else s.kv_ratio,
                "peak_memory_bytes": "" if s.peak_memory_bytes is None else s.peak_memory_bytes,
                "mean_exit_layer": "" if s.mean_exit_layer is None else s.mean_exit_layer,
                "mean_visual_in": "" if s.mean_visual_in is None else s.mean_visual_in,
                "settings": json.dumps(s.settings, sort_keys=True),
            }
        )
        for row in _per_type_rows(s):
            rows.append({**{c: "" for c in CSV_COLUMNS}, **dict(zip(PER_TYPE_COLUMNS, row, strict=True))})
    return rows


def _per_type_rows(s: StrategyResult) -> list[list[Any]]:
    return [
        [s.name, s.method, qtype, g.n, g.accuracy, g.agreement, g.flops_ratio]
        for qtype, g in s.per_type.items()
    ]


def budget_sentence(verdict: BudgetVerdict) -> str:
    """The one-line answer: best strategy within the budget, then where each family falls."""
    share = f"{100 * verdict.budget:g}%"
    if verdict.best is None:
        head = f"at <= {share} of the full model's LM FLOPs, no strategy qualifies"
    else:
        b = verdict.best
        head = (
            f"at <= {share} of the full model's LM FLOPs, the best method is {b.name} ({b.method}, "
            f"{b.flops_ratio:.2f}x FLOPs) with {_pct(verdict.relative(b))} of the full model's accuracy"
        )
    peers = []
    for family, best in verdict.per_family.items():
        if best is not None:
            peers.append(f"{family}: {best.name} at {best.flops_ratio:.2f}x, {_pct(verdict.relative(best))}")
        else:
            c = verdict.cheapest[family]
            peers.append(
                f"{family}: none within budget (cheapest {c.name} at {c.flops_ratio:.2f}x, {_pct(verdict.relative(c))})"
            )
    return head + ("; by family: " + "; ".join(peers) if peers else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> list[str]:
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def summary_markdown(
    result: HarnessResult, budget: float, title: str = "Visual-token reduction, side by side"
) -> str:
    """Markdown: the per-strategy table, per-question-type accuracy and agreement tables, the verdict."""
    full = result.full
    gpu = any(s.peak_memory_bytes is not None for s in result.strategies)
    header = [
        "strategy",
        "method",
        "accuracy",
        "rel. acc.",
        "agreement",
        "FLOPs ratio",
        "time ratio",
        "KV MiB",
    ]
    header += ["peak GPU MiB"] if gpu else []
    header += ["mean K", "visual in"]
    rows = []
    for s in result.strategies:
        rel = s.accuracy / full.accuracy if full.accuracy > 0 else math.nan
        row = [s.name, s.method, _num(s.accuracy), _pct(rel), _num(s.agreement), _num(s.flops_ratio)]
        row += [_num(s.time_ratio, ".2f"), _mib(s.kv_bytes)]
        row += [_mib(s.peak_memory_bytes)] if gpu else []
        row += [_num(s.mean_exit_layer, ".2f"), _num(s.mean_visual_in, ".1f")]
        rows.append(row)
    types = list(result.question_types)
    meta = result.meta
    lines = [f"# {title}", ""]
    if meta.get("model"):
        lines.append(f"Model: `{meta['model']}`, {result.num_layers} decoder layers.")
    lines.append(
        f"{result.num_samples} evaluated samples ({', '.join(f'{t}: {n}' for t, n in result.question_types.items())}); "
        f"greedy decoding. FLOPs: analytic LM prefill, mean per-sample ratio to the full model, each sample at its "
        f"own prompt length{_lengths(meta)}. Visual in: visual tokens entering the LM after pre-LLM pruning. Time: median "
        f"prefill of one fixed batch of {result.timing_batch_size} prompts, all strategies interleaved, over the "
        f"full model's. KV MiB: cache after prefilling that batch."
    )
    for key, what in (("calibration", "VTW calibrated"), ("answer_calibration", "VTW answer-KL")):
        cal = result.calibration if key == "calibration" else meta.get(key)
        if cal:
            lines.append(
                f"{what}: K = {cal['exit_layer']} ({cal['metric']} KL <= eta {cal['threshold']:g}"
                f"{', ' + cal['threshold_source'] if cal.get('threshold_source') else ''}; "
                f"{cal['num_samples']} samples not evaluated)."
            )
    if result.shortv:
        lines.append(f"ShortV freezing order (least contributing first): {result.shortv['frozen_order']}.")
    lines += ["", "## Strategies", "", *_table(header, rows, text_columns=2), ""]
    for what, attr in (("accuracy", "accuracy"), ("agreement with the full model", "agreement")):
        lines += [f"## Per question type: {what}", ""]
        type_header = ["strategy", *(f"{t} (n={result.question_types[t]})" for t in types), OVERALL]
        type_rows = [
            [
                s.name,
                *(_num(getattr(s.per_type[t], attr)) if t in s.per_type else "–" for t in types),
                _num(getattr(s, attr)),
            ]
            for s in result.strategies
        ]
        lines += [*_table(type_header, type_rows), ""]
    lines += ["## Verdict", "", budget_sentence(budget_verdict(result, budget)), ""]
    return "\n".join(lines)


def write_reports(
    result: HarnessResult, records: Sequence[VQARecord], out_dir: str | Path, budget: float
) -> dict[str, Path]:
    """results.json, results.csv, predictions.jsonl and summary.md in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "csv": out / "results.csv",
        "predictions": out / "predictions.jsonl",
        "summary": out / "summary.md",
    }
    data = result.to_dict()
    data["budget"] = {"max_flops_ratio": budget, "verdict": budget_sentence(budget_verdict(result, budget))}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(result))
    with paths["predictions"].open("w") as handle:
        for i, record in enumerate(records):
            row = {"id": record.id, "question_type": record.question_type, "answer": record.answer}
            row["predictions"] = {s.name: s.predictions[i] for s in result.strategies}
            handle.write(json.dumps(row) + "\n")
    paths["summary"].write_text(summary_markdown(result, budget))
    return paths


def strategy_table(result: HarnessResult) -> list[list[Any]]:
    """Rows for W&B, one per strategy, in ``STRATEGY_TABLE_COLUMNS``."""
    return [
        [s.name, s.method, s.accuracy, s.agreement, s.flops_ratio, _none(s.time_ratio), s.kv_bytes]
        for s in result.strategies
    ]


def per_type_table(result: HarnessResult) -> list[list[Any]]:
    """Rows for W&B, one per strategy and question type, in ``PER_TYPE_COLUMNS``."""
    return [row for s in result.strategies for row in _per_type_rows(s)]


def _none(value: float) -> float | None:
    return None if math.isnan(value) else value
