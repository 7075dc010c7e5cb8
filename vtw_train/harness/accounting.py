"""Analytic language-model prefill FLOPs of each evaluated sample under its strategy (METHODS.md §11).

Each sample is costed from its own text and visual token counts *before* any pruning, and its
ratio to the full model on that same prompt is what gets averaged; a mean of ratios, so that
long and short prompts weigh the same, as the published per-benchmark ratios do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..flops import DecoderDims, ExitPlan, flops_ratio
from ..methods.fastv import FastV
from .strategies import Strategy


def token_counts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, visual_token_ids: Sequence[int]
) -> tuple[list[int], list[int]]:
    """``(n_text, n_visual)`` per row, padding excluded."""
    visual = torch.isin(input_ids, torch.tensor(list(visual_token_ids), device=input_ids.device))
    real = torch.ones_like(visual) if attention_mask is None else attention_mask.bool()
    n_visual = (visual & real).sum(1).tolist()
    n_text = (~visual & real).sum(1).tolist()
    return [int(n) for n in n_text], [int(n) for n in n_visual]


def sample_plan(
    strategy: Strategy,
    *,
    n_visual: int,
    kept_visual: int | None,
    exit_layer: int | None,
    frozen: frozenset[int],
) -> ExitPlan:
    """The FLOPs plan of one sample.

    ``kept_visual``: tokens VisPruner let into the LLM (None: no pre-LLM pruning);
    ``exit_layer``: where this sample withdrew (None: never); ``frozen``: ShortV's layers.
    FastV keeps ``round(keep_ratio * entering)`` tokens, as the engine does.
    """
    fastv = None
    if strategy.fastv_layer is not None:
        entering = n_visual if kept_visual is None else kept_visual
        kept = FastV(strategy.fastv_layer, float(strategy.fastv_keep_ratio or 0.0)).kept_count(entering)
        fastv = (strategy.fastv_layer, kept)
    return ExitPlan(exit_layer=exit_layer, kept_visual_tokens=kept_visual, fastv=fastv, frozen_layers=frozen)


def sample_ratios(
    dims: DecoderDims,
    strategy: Strategy,
    n_text: Sequence[int],
    n_visual: Sequence[int],
    kept_visual: Sequence[int] | None,
    exit_layers: Sequence[int | None],
    frozen: frozenset[int],
) -> list[float]:
    """Prefill FLOPs over the full model's, per sample of one batch."""
    out = []
    for i, (nt, nv, k) in enumerate(zip(n_text, n_visual, exit_layers, strict=True)):
        kept = None if kept_visual is None else int(kept_visual[i])
        plan = sample_plan(strategy, n_visual=nv, kept_visual=kept, exit_layer=k, frozen=frozen)
        out.append(flops_ratio(dims, nt, nv, plan))
    return out
