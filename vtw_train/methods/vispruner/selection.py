"""VisPruner's token selection: importance from the vision tower, then diverse tokens (docs/methods.md §5.1).

Per image (per crop on LLaVA-NeXT), with budgets T_imp = int(T * r) and T_div = T - T_imp:

1. Importance. CLIP towers: the head-averaged attention of the [CLS] query over the patches, at
   the encoder layer whose output feeds the projector, computed from that layer's input with its
   own ``layer_norm1``, ``q_proj`` and ``k_proj`` (CLIP keeps running on SDPA). Qwen2-VL (no
   [CLS]): the attention each patch receives in the last vision block, averaged over each 2x2
   group that the patch merger fuses into one token.
2. Important tokens: the top T_imp by importance.
3. Diverse tokens: the rest, in descending importance, go through a ToMe-style drop: split the
   list by position into A (even) and B (odd), score each a in A by its highest cosine similarity
   to B, drop the ``min(8, R - T_div, |A|)`` highest-scoring A tokens, and continue on "kept A (by
   descending score) + B" until T_div remain. A and B are sized from their actual lengths, so odd
   residual counts work, and r = 1 never loops.
4. Kept tokens stay in raster order.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

#: Most near-duplicates dropped per round of the diversity step (the reference's value).
DIVERSITY_STEP = 8


def check_num_tokens(num_tokens: Any) -> int:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral):
        raise ValueError(
            f"num_tokens (T, visual tokens kept per image) must be an integer >= 1, got {num_tokens!r}"
        )
    if num_tokens < 1:
        raise ValueError(
            f"num_tokens (T, visual tokens kept per image) must be >= 1, got {num_tokens}; "
            "to drop every visual token use the exit engine with exit_layer=0 instead"
        )
    return int(num_tokens)


def check_ratio(important_ratio: Any) -> float:
    if isinstance(important_ratio, bool) or not isinstance(important_ratio, numbers.Real):
        raise ValueError(f"important_ratio must be a number in [0, 1], got {important_ratio!r}")
    ratio = float(important_ratio)
    if math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"important_ratio must be in [0, 1], got {important_ratio!r}")
    return ratio


def budgets(num_tokens: int, important_ratio: float) -> tuple[int, int]:
    important = int(num_tokens * important_ratio)
    return important, num_tokens - important


@torch.no_grad()
def cls_attention_importance(layer: torch.nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention of the [CLS] query (token 0) over the patch tokens, in one CLIP
    encoder layer, computed from that layer's input without running it in eager mode.

    ``layer`` is a ``CLIPEncoderLayer`` (``layer_norm1``, ``self_attn.{q,k}_proj``), ``layer_input``
    is ``[n_images, 1 + P, D]``. Returns ``[n_images, P]`` in float32 (each row sums to 1 minus the
    CLS-to-CLS weight), equal to ``attentions[:, :, 0, 1:].mean(1)`` of an eager run.
    """
    attn = layer.self_attn
    heads, head_dim = attn.num_heads, attn.head_dim
    n, seq = layer_input.shape[:2]
    normed = layer.layer_norm1(layer_input)
    query = attn.q_proj(normed[:, :1]).view(n, 1, heads, head_dim).transpose(1, 2)
    keys = attn.k_proj(normed).view(n, seq, heads, head_dim).transpose(1, 2)
    scores = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * attn.scale
    probs = scores.softmax(dim=-1)  # [n, heads, 1, seq]
    return probs.mean(dim=1)[:, 0, 1:]


@torch.no_grad()
def received_attention_importance(
    block: torch.nn.Module,
    block_input: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    merge_size: int,
) -> list[torch.Tensor]:
    """Attention each patch *receives* in one Qwen2-VL vision block (mean over queries and heads),
    per image, then averaged over the ``merge_size**2`` consecutive patches the patch merger fuses.

    ``block_input`` is the block's input ``[sum(patches), D]`` (all images packed), ``cu_seqlens`` the
    image boundaries and ``position_embeddings`` the vision rotary ``(cos, sin)`` the block was called
    with. Returns one float32 tensor ``[patches_i / merge_size**2]`` per image.
    """
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    attn = block.attn
    seq = block_input.shape[0]
    qkv = attn.qkv(block.norm1(block_input)).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
    query, key = qkv[0], qkv[1]
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)
    group = merge_size * merge_size
    out = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q = query[start:end].transpose(0, 1).float()  # [heads, S_i, hd]
        k = key[start:end].transpose(0, 1).float()
        probs = (torch.matmul(q, k.transpose(-1, -2)) * attn.scaling).softmax(dim=-1)
        received = probs.mean(dim=(0, 1))  # [S_i]
        out.append(received.view(-1, group).mean(dim=-1))
    return out


@dataclass(frozen=True)
class TokenSelection:
    """Outcome of VisPruner's selection on one image (or crop), as indices into its tokens.

    ``kept`` is ascending (raster order) and is the union of ``important`` (descending importance)
    and ``diverse`` (the survivors of the diversity step, in its final list order).
    """

    kept: torch.Tensor
    important: torch.Tensor
    diverse: torch.Tensor
    num_candidates: int


def _drop_near_duplicates(residual: torch.Tensor, normed: torch.Tensor, target: int) -> torch.Tensor:
    """ToMe-style drop (docs/methods.md §5.1 step 4) on the index list ``residual`` until ``target`` remain."""
    if target <= 0:
        return residual[:0]
    while residual.numel() > target:
        count = residual.numel()
        side_a, side_b = residual[0::2], residual[1::2]  # actual lengths: ceil(R/2) and floor(R/2)
        step = min(DIVERSITY_STEP, count - target, side_a.numel())
        similarity = normed[side_a] @ normed[side_b].T  # [|A|, |B|], |B| >= 1 because R > target >= 1
        best = similarity.max(dim=-1).values
        order = torch.argsort(best, descending=True, stable=True)
        residual = torch.cat([side_a[order[step:]], side_b])
    return residual


class RandomSelection:
    """The control for VisPruner's ranking: T tokens per image drawn uniformly at random (seeded), from the
    same candidates, kept in raster order, everything else as VisPruner does it. If VisPruner does not
    beat this, its [CLS] ranking is not what keeps the answers right."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self,
        importance: torch.Tensor,
        features: torch.Tensor,
        num_tokens: int,
        important_ratio: float = 0.5,
        *,
        candidates: torch.Tensor | None = None,
    ) -> TokenSelection:
        pool = torch.arange(importance.shape[0])
        if candidates is not None:
            pool = pool[candidates.cpu().bool()]
        chosen = pool[torch.randperm(pool.numel(), generator=self.generator)[: min(num_tokens, pool.numel())]]
        kept = torch.sort(chosen).values.to(importance.device)
        return TokenSelection(kept=kept, important=kept[:0], diverse=kept, num_candidates=pool.numel())


@torch.no_grad()
def select_visual_tokens(
    importance: torch.Tensor,
    features: torch.Tensor,
    num_tokens: int,
    important_ratio: float = 0.5,
    *,
    candidates: torch.Tensor | None = None,
) -> TokenSelection:
    """VisPruner's selection on one image: top ``int(T * r)`` by ``importance`` ``[P]``, then diverse
    tokens by cosine similarity of ``features`` ``[P, D]``, T in all; indices in raster order.

    ``candidates`` (bool ``[P]``) restricts the choice to some tokens (LLaVA-NeXT: those that survive
    unpadding). With T >= the number of candidates every candidate is kept.
    """
    num_tokens = check_num_tokens(num_tokens)
    important_ratio = check_ratio(important_ratio)
    if importance.dim() != 1 or features.dim() != 2 or features.shape[0] != importance.shape[0]:
        raise ValueError(
            f"expected importance [P] and features [P, D], got {tuple(importance.shape)} and "
            f"{tuple(features.shape)}"
        )
    device = importance.device
    pool = torch.arange(importance.shape[0], device=device)
    if candidates is not None:
        pool = pool[candidates.to(device=device, dtype=torch.bool)]
    if num_tokens >= pool.numel():
        empty = pool[:0]
        return TokenSelection(kept=pool, important=empty, diverse=pool, num_candidates=pool.numel())
    n_important, n_diverse = budgets(num_tokens, important_ratio)
    order = pool[torch.argsort(importance[pool].float(), descending=True, stable=True)]
    important, residual = order[:n_important], order[n_important:]
    normed = F.normalize(features.detach().float(), dim=-1)
    diverse = _drop_near_duplicates(residual, normed, n_diverse)
    kept = torch.sort(torch.cat([important, diverse])).values
    return TokenSelection(kept=kept, important=important, diverse=diverse, num_candidates=pool.numel())
