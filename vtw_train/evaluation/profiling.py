"""Measured prefill cost of each strategy on one fixed batch: time, KV-cache bytes, peak GPU memory.

The prefill is what the strategies change (decode is dominated by the weights, docs/methods.md §11),
so that is what is timed: VisPruner's selection (it replaces the vision encoding of the stock
forward) plus one forward that builds the cache and the last position's logits, exactly what
``generate`` runs before its first token. All strategies are timed round-robin in one loop and
compared by medians (``vtw_train.timing``), because a ratio across separate loops is noise here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters import set_adapters
from ..engine import attach
from ..engine.cache import kv_bytes
from ..timing import interleaved_medians
from .strategies import Strategy


@dataclass
class PrefillCost:
    """One strategy's prefill on the timing batch. ``seconds`` is NaN when timing was skipped."""

    seconds: float
    kv_bytes: int
    peak_memory_bytes: int | None


def cache_bytes(cache: Any) -> int:
    """Bytes held by a cache's keys and values over all layers (per-sample exit groups included)."""
    return kv_bytes(cache)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_prefill(
    model: nn.Module,
    strategies: Sequence[Strategy],
    inputs: dict[str, torch.Tensor],
    *,
    repeats: int,
    warmup: int,
) -> dict[str, PrefillCost]:
    """Prefill time (median), KV bytes and CUDA peak memory of every strategy on ``inputs``.

    Switching a strategy in (its reduction and the adapters) is untimed; its pre-LLM work
    (VisPruner) is timed with the forward.
    """
    device = inputs["input_ids"].device
    controller = attach(model)
    state: dict[str, Any] = {}

    def setup_of(strategy: Strategy) -> Callable[[], None]:
        def setup() -> None:
            controller.reduction = strategy.reduction
            set_adapters(model, strategy.adapters)

        return setup

    def prefill_of(strategy: Strategy) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                prepared = strategy.reduction.prepare_inputs(model, inputs)
                state["out"] = model(**prepared, use_cache=True, logits_to_keep=1)
            _sync(device)

        return run

    runs = {s.name: prefill_of(s) for s in strategies}
    setups = {s.name: setup_of(s) for s in strategies}
    costs: dict[str, PrefillCost] = {}
    for s in strategies:  # one untimed pass each: the cache size and the peak memory
        setups[s.name]()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs[s.name]()
        peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        costs[s.name] = PrefillCost(math.nan, cache_bytes(state.pop("out").past_key_values), peak)
    if repeats > 0:
        medians = interleaved_medians(runs, repeats=repeats, warmup=warmup, setup=setups)
        for name, seconds in medians.items():
            costs[name].seconds = seconds
    state.clear()
    return costs
