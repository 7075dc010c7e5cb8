"""Side-by-side timing: variants run interleaved (A B A B ...) and are compared by medians.

These machines drift by ~15% between runs, so a ratio is only meaningful when both sides
were measured in the same loop.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(
    variants: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    setup: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each variant, measured round-robin.

    ``setup[name]`` (optional) runs untimed right before each timed call of ``name``, e.g. to
    switch the engine on or off or to build a fresh cache.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    setup = setup or {}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_idx in range(warmup + repeats):
        for name, fn in variants.items():
            if name in setup:
                setup[name]()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_idx >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}
