"""Shared setup for the test suite; the engine tests (``tests/engine/``) get one thread and a fixed seed.

Kept to plain functions: every test builds its own tiny model (milliseconds), so there is no
model state shared between tests that a failing test could leave behind. The helper modules
next to this file (``engine_helpers``, ``miniature``, ``reference_loop``) are importable from
every test folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Tests never talk to W&B (the offline path is tested in a subprocess in test_wandb.py).
os.environ.setdefault("WANDB_MODE", "disabled")
from typing import Any

import pytest
import torch

from vtw_train.tiny_models import visual_token_mask

NUM_LAYERS = 4  # tiny_model's default decoder depth
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def mixed_specs(family: str) -> list[dict[str, Any]]:
    """Four samples with different numbers of visual tokens and different text lengths: one image,
    two images (of different sizes where the family allows it), no image, one image of another size.
    LLaVA resizes every image to one size, so its counts differ by the number of images only."""
    if family == "llava_next":
        sizes: list[Any] = [[(28, 56)], [(56, 56), (40, 30)], None, [(60, 20)]]
    elif family in QWEN_FAMILIES:
        sizes = [[(28, 28)], [(28, 56), (42, 28)], None, [(42, 28)]]
    else:
        sizes = [None, None, None, None]
    images = [1, 2, 0, 1]
    lengths = [6, 9, 4, 7]
    return [
        dict(images=images[i], text_length=lengths[i], image_sizes=sizes[i], seed=200 + 7 * i)
        for i in range(4)
    ]


def text_positions(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Positions of the non-visual tokens of one unpadded sample ``[1, n]``."""
    return (~visual_token_mask(model, input_ids[0])).nonzero().squeeze(1)


def num_text_tokens(model: Any, sample: dict[str, torch.Tensor]) -> int:
    return int(text_positions(model, sample["input_ids"]).numel())


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _is_engine_test(request) -> bool:
    return Path(request.module.__file__).parent.name == "engine"


@pytest.fixture(autouse=True, scope="module")
def _single_thread(request):
    """The models are tiny: intra-op threads only add hand-off cost, and on the shared 2-core
    machines they made engine tests ~30x slower under load (5 s vs 0.17 s for one test). Engine
    test modules run on one thread; the caller's setting is restored afterwards."""
    if not _is_engine_test(request):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _grad_mode_and_seed(request):
    """Each engine test starts from a fixed global seed, and autograd must be on before and after
    it: docs/engine.md, trap 12 (a module that switches autograd off at import time, or a test that
    leaks ``torch.set_grad_enabled(False)``) would otherwise silently change every later test."""
    if not _is_engine_test(request):
        yield
        return
    assert torch.is_grad_enabled(), "autograd was switched off globally before this test"
    torch.manual_seed(0)
    yield
    assert torch.is_grad_enabled(), "this test left autograd switched off globally"
