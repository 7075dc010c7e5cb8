"""ShortV's Layer Contribution: which layers' visual-token updates matter least (docs/methods.md §6.2).

LC_l = KL(P_l || P_full) at the last prompt position when layer l's visual updates are removed
(the layer runs with its visual tokens frozen); the N layers with the smallest LC are frozen.
It is the same last-token KL recipe as VTW's calibration, on the same engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..engine import attach
from ..fingerprint import model_fingerprint
from .kl import kl_divergence, log_probs
from .record import RecordFile
from .targets import states_at, target_positions

RECORD_FORMAT = "vtw-shortv/1"


@dataclass
class ShortVRecord(RecordFile):
    """Layer Contribution scores and the layers ShortV freezes, saved next to checkpoints."""

    FORMAT: ClassVar[str] = RECORD_FORMAT
    KIND: ClassVar[str] = "ShortV record"
    HOW_TO_REMAKE: ClassVar[str] = "measure it again with layer_contribution()"

    layer_contribution: list[float]
    num_samples: int
    model_fingerprint: str
    format: str = RECORD_FORMAT
    frozen_order: list[int] = field(default_factory=list)

    def frozen_layers(self, n: int) -> frozenset[int]:
        """The ``n`` least contributing layers."""
        if not 0 <= n <= len(self.frozen_order):
            raise ValueError(f"ShortV N={n} is outside [0, {len(self.frozen_order)}].")
        return frozenset(self.frozen_order[:n])


def _last_log_probs(controller, head: nn.Module, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
    hidden = controller.wrapper(**inputs, use_cache=False)[0]
    return log_probs(head, states_at(hidden, positions)[:, 0])


@torch.no_grad()
def layer_contribution(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], num_samples: int = 20
) -> ShortVRecord:
    """LC_l = KL(P_l || P_full) at the last prompt position with layer l's visual updates removed."""
    controller = attach(model)
    num_layers = controller.num_layers
    sums = [0.0] * num_layers
    seen = 0
    head = model.get_output_embeddings()
    for batch in batches:
        if seen >= num_samples:
            break
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        positions, _ = target_positions(batch, "first_token")
        with controller.using():
            full = _last_log_probs(controller, head, inputs, positions)
        for layer in range(num_layers):
            with controller.using(frozen_layers={layer}):
                perturbed = _last_log_probs(controller, head, inputs, positions)
            sums[layer] += float(kl_divergence(perturbed, full).sum())
        seen += inputs["input_ids"].shape[0]
    if seen == 0:
        raise ValueError("ShortV calibration got no samples.")
    scores = [s / seen for s in sums]
    order = sorted(range(num_layers), key=lambda layer: scores[layer])
    return ShortVRecord(
        layer_contribution=scores,
        num_samples=seen,
        model_fingerprint=model_fingerprint(model),
        frozen_order=order,
    )
