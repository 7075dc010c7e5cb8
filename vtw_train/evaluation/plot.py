"""Accuracy against LM prefill FLOPs, one curve per method family: the picture the comparison is about.

Matplotlib runs on the Agg backend (no display on the machines that run this), selected per
figure through ``matplotlib.figure.Figure`` so that importing this module never changes the
backend of a caller's own plots.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .results import HarnessResult, StrategyResult
from .strategies import FAMILIES

_MARKERS = "osD^v<>PXh*"


def accuracy_vs_flops(
    result: HarnessResult,
    path: str | Path,
    *,
    budget: float | None = 0.5,
    title: str = "Accuracy vs LM prefill FLOPs",
) -> Path:
    """Write the PNG: x = FLOPs ratio, y = accuracy; families as lines sorted by FLOPs; the full model as a reference."""
    families: dict[str, list[StrategyResult]] = defaultdict(list)
    for s in result.strategies[1:]:
        families[s.method].append(s)
    order = [f for f in FAMILIES if f in families] + sorted(f for f in families if f not in FAMILIES)

    fig = Figure(figsize=(10, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    full = result.full
    ax.axhline(full.accuracy, color="0.35", linestyle="--", linewidth=1, zorder=1)
    ax.plot(
        [1.0],
        [full.accuracy],
        marker="*",
        markersize=14,
        color="black",
        linestyle="none",
        label=f"full model ({full.accuracy:.3f})",
        zorder=5,
    )
    if budget is not None:
        ax.axvline(budget, color="0.6", linestyle=":", linewidth=1, zorder=1)
        ax.text(
            budget,
            0.02,
            f" {100 * budget:g}% FLOPs",
            transform=ax.get_xaxis_transform(),
            color="0.4",
            fontsize=8,
            va="bottom",
        )
    for i, family in enumerate(order):
        points = sorted(families[family], key=lambda s: s.flops_ratio)
        xs = [s.flops_ratio for s in points]
        ys = [s.accuracy for s in points]
        ax.plot(
            xs,
            ys,
            marker=_MARKERS[i % len(_MARKERS)],
            linewidth=1.5,
            markersize=6,
            alpha=0.85,
            label=f"{family} ({len(points)})",
            zorder=3,
        )
    accuracies = [s.accuracy for s in result.strategies if not math.isnan(s.accuracy)]
    low = min(accuracies, default=0.0)
    ax.set_ylim(max(0.0, low - 0.05), min(1.02, max(accuracies, default=1.0) + 0.05))
    ax.set_xlim(0.0, 1.05)
    ax.set_xlabel("language-model prefill FLOPs / full model (analytic)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(f"{title} ({result.num_samples} samples)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="method (settings)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
