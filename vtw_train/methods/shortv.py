"""ShortV: in layers whose visual-token updates matter least, visual tokens are frozen.

METHODS.md §6. In a frozen layer, keys and values are computed for every token (text still
reads the image), but only text tokens are queried and only text rows get the attention
output and MLP update; visual rows pass through unchanged. The KV cache keeps every token,
so only prefill gets cheaper. Which layers to freeze comes from Layer Contribution: the KL
at the last prompt position when one layer's visual updates are removed (the same
last-token KL recipe as VTW's calibration).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from ..atomic_write import write_text_atomically
from ..engine.layout import build_text_layout
from .attention import keys_values

RECORD_FORMAT = "vtw-shortv/1"


class _ReturnKV:
    """Cache stand-in: the layer's attention gets the keys/values of every token, whatever it computed."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.keys, self.values


def frozen_layer_forward(
    layer: nn.Module,
    layer_idx: int,
    hidden: torch.Tensor,
    visual: torch.Tensor,
    padding: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: Any,
    cache: Any,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """Run ``layer`` with visual tokens frozen; returns the full-stream output.

    ``hidden``/``visual``/``padding``/``cos``/``sin`` cover the rows of one group in the full
    layout. ``cache`` (the real cache or a capture) receives the keys/values of every token.
    """
    implementation = config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"ShortV frozen layers need attn_implementation 'sdpa' or 'eager', not {implementation!r}."
        )
    batch = hidden.shape[0]
    cos, sin = (t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t for t in (cos, sin))
    normed = layer.input_layernorm(hidden)
    keys, values = keys_values(layer, normed, cos, sin)
    layout = build_text_layout(visual, padding)
    text_hidden = layout.gather(hidden)
    text_cos, text_sin = layout.gather(cos), layout.gather(sin)
    query_pos = layout.index  # original positions of the text queries
    real = torch.ones_like(visual) if padding is None else padding.bool()

    def mask_function(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx <= query_pos[batch_idx, q_idx]

    mask = ALL_MASK_ATTENTION_FUNCTIONS[implementation](
        batch_size=hidden.shape[0],
        q_length=layout.length,
        kv_length=hidden.shape[1],
        q_offset=0,
        kv_offset=0,
        mask_function=mask_function,
        attention_mask=real,
        allow_is_causal_skip=False,
        dtype=hidden.dtype,
        device=hidden.device,
    )
    out_text = layer(
        text_hidden,
        attention_mask=mask,
        position_embeddings=(text_cos, text_sin),
        position_ids=None,
        past_key_values=_ReturnKV(keys, values),
        use_cache=True,
        **kwargs,
    )
    if cache is not None:
        cache.update(keys, values, layer_idx)
    return layout.scatter(
        out_text, hidden, torch.arange(hidden.shape[0], device=hidden.device), keep_others=True
    )


@dataclass
class ShortVRecord:
    """Layer Contribution scores and the layers ShortV freezes, saved next to checkpoints."""

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

    def save(self, path: str | os.PathLike) -> Path:
        return write_text_atomically(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShortVRecord:
        data = json.loads(Path(path).read_text())
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"{path} is not a ShortV record (format {data.get('format')!r}).")
        return cls(**data)


def _last_log_probs(controller, head: nn.Module, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
    hidden = controller.wrapper(**inputs, use_cache=False)[0]
    state = torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return F.log_softmax(head(state[:, 0]).float(), dim=-1)


@torch.no_grad()
def layer_contribution(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], num_samples: int = 20
) -> ShortVRecord:
    """LC_l = KL(P_l || P_full) at the last prompt position with layer l's visual updates removed."""
    from ..calibrate import target_positions
    from ..engine import attach
    from ..fingerprint import model_fingerprint

    controller = attach(model)
    num_layers = controller.num_layers
    saved = (controller.exit_layer, controller.dynamic_exit, controller.frozen_layers)
    sums = [0.0] * num_layers
    seen = 0
    head = model.get_output_embeddings()
    try:
        controller.exit_layer, controller.dynamic_exit = None, None
        for batch in batches:
            if seen >= num_samples:
                break
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            positions, _ = target_positions(batch, "first_token")

            controller.frozen_layers = frozenset()
            full = _last_log_probs(controller, head, inputs, positions)
            for layer in range(num_layers):
                controller.frozen_layers = frozenset({layer})
                perturbed = _last_log_probs(controller, head, inputs, positions)
                sums[layer] += float((perturbed.exp() * (perturbed - full)).sum(-1).sum())
            seen += inputs["input_ids"].shape[0]
    finally:
        controller.exit_layer, controller.dynamic_exit, controller.frozen_layers = saved
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
