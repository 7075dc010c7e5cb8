"""Accuracy per question type at every fixed exit layer K: where each kind of question stops needing the image.

A preset of the one evaluation loop (VTW at K = 0..L); the toy model's evaluation script prints
it next to the KL calibration curve, and it is the evidence that a per-input gate can beat any
fixed K (each question type has its own safe depth).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..data.records import VQARecord
from ..engine import Reduction, attach
from .scoring import ExactMatchResult, evaluate_exact_match


def exit_layer_sweep(
    model: nn.Module,
    processor: Any,
    records: Sequence[VQARecord],
    layers: Sequence[int] | None = None,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict[int, ExactMatchResult]:
    """``{K: ExactMatchResult}`` for each K in ``layers`` (default: every K from 0 to L)."""
    num_layers = attach(model).num_layers
    chosen = range(num_layers + 1) if layers is None else layers
    return {
        k: evaluate_exact_match(
            model,
            processor,
            records,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            reduction=Reduction(exit_layer=k),
            progress=progress,
        )
        for k in chosen
    }
