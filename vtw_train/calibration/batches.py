"""Calibration batches from records: the one way every command turns VQA records into calibration input."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch

from ..data.collate import VLMCollator, collated_batches
from ..data.records import VQARecord


def calibration_batches(
    processor: Any,
    records: Sequence[VQARecord],
    batch_size: int,
    *,
    device: torch.device | str | None = None,
    mode: Literal["train", "generate"] = "train",
) -> Iterator[dict[str, torch.Tensor]]:
    """Model-input batches of ``records``, in order.

    ``train`` collation (prompt + answer, ``labels`` on the answer) serves both KL metrics and
    Layer Contribution; ``generate`` collation (left-padded prompts) serves ``first_token`` only.
    """
    for batch in collated_batches(records, VLMCollator(processor, mode=mode), batch_size):
        yield batch if device is None else {k: v.to(device) for k, v in batch.items()}
