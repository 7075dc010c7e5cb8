"""A decoder layer in which visual tokens are frozen (ShortV's kernel, docs/methods.md §6.1).

Keys and values are computed for every token, so text still reads the image, but only text
tokens are queried and only text rows get the attention output and MLP update; visual rows
pass through unchanged. The cache keeps every token, so only prefill gets cheaper. Which
layers to freeze is a calibration question (``vtw_train.calibration.layer_contribution``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from .attention import keys_values
from .layout import TextLayout, build_text_layout


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
    layout: TextLayout | None = None,
) -> torch.Tensor:
    """Run ``layer`` with visual tokens frozen; returns the full-stream output.

    ``hidden``/``visual``/``padding``/``cos``/``sin`` cover the rows of one group in the full
    layout. ``cache`` (the real cache or a capture) receives the keys/values of every token.
    ``layout`` is those rows' text layout when the caller has it (building it reads the longest
    text from the device, a host sync).
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
    if layout is None:
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
