"""A decoder layer in which visual tokens are frozen (ShortV's kernel, docs/methods.md §6.1).

Keys and values are computed for every token, so text still reads the image, but only text
tokens are queried and only text rows get the attention output and MLP update; visual rows
pass through unchanged. The cache keeps every token, so only prefill gets cheaper. Which
layers to freeze is a calibration question (``vtw_train.calibration.layer_contribution``).

Everything that does not depend on the layer (where the text sits, the attention mask of text
queries over all keys, the text's rotary tables, where the results go back) is a
:class:`FrozenPlan`, built once per prefill and group of rows: ShortV freezes most layers, and
rebuilding it per layer cost more launches than the layer saved at batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class FrozenPlan:
    """What every frozen layer of one prefill needs for one group of rows, whatever the layer.

    ``text_index[b, j]``: full-stream position of text slot ``j`` (padding slots point at 0);
    ``scatter_index``: the same with padding slots sent to a spare column ``full_length``, so writing
    the text back never touches another position; ``mask``: text queries over all keys, causal by
    original position; ``text_cos``/``text_sin``: the text slots' rotary tables.
    """

    text_index: torch.Tensor
    scatter_index: torch.Tensor
    mask: torch.Tensor
    text_cos: torch.Tensor
    text_sin: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The plan as plain tensors (inputs of a recorded graph), in the order :meth:`from_tensors` reads."""
        return self.text_index, self.scatter_index, self.mask, self.text_cos, self.text_sin

    @classmethod
    def from_tensors(cls, *tensors: torch.Tensor) -> FrozenPlan:
        return cls(*tensors)


def frozen_plan(
    visual: torch.Tensor,
    padding: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: Any,
    dtype: torch.dtype,
    layout: TextLayout | None = None,
) -> FrozenPlan:
    """The plan of the rows ``visual``/``padding``/``cos``/``sin`` cover (full layout).

    ``layout`` is those rows' text layout when the caller has it (building it reads the longest text
    from the device, a host sync).
    """
    implementation = config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"ShortV frozen layers need attn_implementation 'sdpa' or 'eager', not {implementation!r}."
        )
    batch, length = visual.shape
    cos, sin = (t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t for t in (cos, sin))
    if layout is None:
        layout = build_text_layout(visual, padding)
    query_pos = layout.index  # original positions of the text queries
    real = torch.ones_like(visual) if padding is None else padding.bool()

    def mask_function(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx <= query_pos[batch_idx, q_idx]

    mask = ALL_MASK_ATTENTION_FUNCTIONS[implementation](
        batch_size=batch,
        q_length=layout.length,
        kv_length=length,
        q_offset=0,
        kv_offset=0,
        mask_function=mask_function,
        attention_mask=real,
        allow_is_causal_skip=False,
        dtype=dtype,
        device=visual.device,
    )
    return FrozenPlan(
        text_index=layout.index,
        scatter_index=torch.where(layout.valid, layout.index, length),
        mask=mask,
        text_cos=layout.gather(cos),
        text_sin=layout.gather(sin),
    )


def frozen_layer_forward(
    layer: nn.Module,
    layer_idx: int,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    plan: FrozenPlan,
    cache: Any,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """Run ``layer`` with visual tokens frozen; returns the full-stream output.

    ``hidden``/``cos``/``sin`` cover the rows of one group in the full layout, ``plan`` the same rows.
    ``cache`` (the real cache or a capture) receives the keys/values of every token.
    """
    batch = hidden.shape[0]
    cos, sin = (t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t for t in (cos, sin))
    keys, values = keys_values(layer, layer.input_layernorm(hidden), cos, sin)
    width = hidden.shape[-1]
    text_hidden = torch.gather(hidden, 1, plan.text_index.unsqueeze(-1).expand(-1, -1, width))
    out_text = layer(
        text_hidden,
        attention_mask=plan.mask,
        position_embeddings=(plan.text_cos, plan.text_sin),
        position_ids=None,
        past_key_values=_ReturnKV(keys, values),
        use_cache=True,
        **kwargs,
    )
    if cache is not None:
        cache.update(keys, values, layer_idx)
    # Write the text rows back; padding slots land in a spare column that is dropped.
    spare = torch.nn.functional.pad(hidden, (0, 0, 0, 1))
    scattered = spare.scatter(1, plan.scatter_index.unsqueeze(-1).expand(-1, -1, width), out_text)
    return scattered[:, : hidden.shape[1]]
