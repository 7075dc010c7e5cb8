"""Pieces of a decoder layer's attention, recomputed from its own modules.

FastV needs the last prompt token's attention row and ShortV needs keys/values of every
token while only text tokens are queried. Both read the layer's own projections and the
model's own rotary tables, so nothing of transformers' modeling code is copied and the
attention backend (SDPA, eager) stays as configured.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: ``[B, H, T, d]``; ``cos``/``sin``: ``[B, T, d]`` as the model's rotary module returns them."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def keys_values(layer: nn.Module, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotated keys and values ``[B, H_kv, T, d]`` of ``normed`` (the layer's input_layernorm output)."""
    attn = layer.self_attn
    b, t, _ = normed.shape
    shape = (b, t, -1, attn.head_dim)
    keys = attn.k_proj(normed).view(shape).transpose(1, 2)
    values = attn.v_proj(normed).view(shape).transpose(1, 2)
    return apply_rope(keys, cos, sin), values


def query_attention_row(
    layer: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query_index: torch.Tensor,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """Head-averaged softmax attention of one query per sample over all keys: ``[B, T]``.

    ``hidden`` is the layer's input; ``query_index[b]`` the query position; ``key_mask[b, j]``
    True where key j may be attended (causal and not padding). The softmax is taken per head,
    then heads are averaged, as FastV's reference averages its attention maps.
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    b = hidden.shape[0]
    rows = torch.arange(b, device=hidden.device)
    q_in = normed[rows, query_index].unsqueeze(1)
    query = attn.q_proj(q_in).view(b, 1, -1, attn.head_dim).transpose(1, 2)
    query = apply_rope(query, cos[rows, query_index].unsqueeze(1), sin[rows, query_index].unsqueeze(1))
    keys, _ = keys_values(layer, normed, cos, sin)
    groups = query.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    scores = (query.float() @ keys.float().transpose(-1, -2)).squeeze(2) * attn.scaling  # [B, H, T]
    scores = scores.masked_fill(~key_mask.unsqueeze(1), float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)
