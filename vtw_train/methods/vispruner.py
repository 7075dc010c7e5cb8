"""VisPruner: prune visual tokens between the vision encoder and the LLM (METHODS.md §5).

Why this module: VisPruner decides which visual tokens the language model ever sees, from signals of
the vision encoder alone ([CLS] attention for importance, feature similarity for diversity). The LLM is
untouched and simply receives a shorter prompt, so prefill, the KV cache and decode all get cheaper,
and the exit engine (``vtw_train.attach``) composes with it unchanged (METHODS.md §10).

How it plugs into stock transformers 5.x without forking modeling code:

* The image features are computed once here with the model's own ``get_image_features`` (so, when
  every token is kept, they are bit-identical to the stock forward's), pruned per image, and handed
  back as ``mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[...])}``. Both
  ``model(**inputs)`` and ``model.generate(**inputs)`` accept that argument in 5.x: ``generate()``
  itself encodes images into it before prefill (ENGINE_NOTES trap 1), and skips encoding when it is
  already there.
* Each image's placeholder run in ``input_ids`` is shortened to its kept count, and every per-token
  tensor (``attention_mask``, ``labels``, ``mm_token_type_ids``, ``token_type_ids``) is shortened with
  it and re-padded on the side it was padded on. ``pixel_values``, ``image_sizes`` and
  ``image_grid_thw`` are consumed.
* Positions. LLaVA / LLaVA-NeXT: none are passed, so the model derives *compacted* positions from the
  shortened prompt (``arange`` / the attention mask's cumsum): the LLM simply receives fewer tokens,
  which is the reference's behaviour (METHODS.md §5.1 step 5). Qwen2-VL: the model's own
  ``get_rope_index`` is run on the *unpruned* prompt and the M-RoPE ``(t, h, w)`` ids of the surviving
  tokens are gathered and passed as ``position_ids [3, B, n']``; kept visual tokens keep their grid
  positions and text tokens keep theirs ([ours], METHODS.md §5.1). ``generate()`` continues decode
  positions from the last column (+1), exactly what stock decoding does for a prompt ending in text.

Selection (per image; per crop on LLaVA-NeXT), with budgets T_imp = int(T * r), T_div = T - T_imp:

1. Importance. CLIP towers: the head-averaged attention of the [CLS] query over the patches, at the
   encoder layer whose output feeds the projector (``config.vision_feature_layer``). It is computed
   from that layer's *input* (``output_hidden_states``) with its own ``layer_norm1``, ``q_proj`` and
   ``k_proj``; CLIP keeps running on SDPA (reference defect 5). Qwen2-VL (no [CLS]): the attention each
   patch *receives* in the last vision block (mean over queries and heads, computed the same manual
   way from the block's input, rotary embeddings included), averaged over each 2x2 group that the
   patch merger fuses into one token; pruning acts on the merged tokens.
2. Important tokens: the top T_imp by importance.
3. Diverse tokens: the rest, in descending importance, go through a ToMe-style *drop*: split the list
   by position into A (even) and B (odd), score each a in A by its highest cosine similarity to B
   (L2-normalised features: CLIP patch features at the selected layer; Qwen2-VL merged features),
   drop the ``min(8, R - T_div, |A|)`` highest-scoring A tokens, and continue on "kept A (by
   descending score) + B" until T_div remain. A and B are sized from their actual lengths, so odd
   residual counts work (reference defect 2), and r = 1 never loops (defect 3). Capping the step at
   |A| only matters for tiny residuals (e.g. R = 5, T_div = 1) where the reference would try to drop
   more A tokens than exist.
4. Kept tokens stay in raster order.

LLaVA-NeXT: each crop (base view and every anyres crop) is pruned to T among its tokens that survive
anyres unpadding (tokens in the letterbox padding would be discarded by the model anyway, so they are
not allowed to use up the budget); the image-newline tokens are always kept. The layout is derived
with the model's own ``pack_image_features`` so the kept features and the kept slots line up exactly.

Not supported (clear errors): Qwen2.5-VL (window permutation), videos, ``vision_feature_layer`` lists,
``vision_feature_select_strategy="full"``, CLIP-less LLaVA towers (SigLIP), precomputed
``inputs_embeds`` / ``position_ids`` / ``mm_encoder_outputs``.

Reuse note: ``generate(num_return_sequences>1)`` / beam search expand ``mm_encoder_outputs`` in place
(stock transformers). Build fresh inputs for each such call instead of reusing one returned dict.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vtw_train.errors import UnsupportedModelError
from vtw_train.flops import ExitPlan

__all__ = [
    "DIVERSITY_STEP",
    "ImagePruning",
    "PruneInfo",
    "TokenSelection",
    "VisPruner",
    "cls_attention_importance",
    "prune_visual_tokens",
    "received_attention_importance",
    "select_visual_tokens",
]

#: Most near-duplicates dropped per round of the diversity step (the reference's value).
DIVERSITY_STEP = 8

# Per-token inputs that are shortened with input_ids, and their padding values (None: the pad id).
_PER_TOKEN_KEYS: dict[str, int | None] = {
    "input_ids": None,
    "attention_mask": 0,
    "labels": -100,
    "mm_token_type_ids": 0,
    "token_type_ids": 0,
}
# Inputs that only serve to encode the images; the pruned features replace them.
_CONSUMED_KEYS = ("pixel_values", "image_sizes", "image_grid_thw")
_REJECTED_KEYS = {
    "inputs_embeds": "pass input_ids; the placeholders are located from them",
    "position_ids": "positions are derived from the pruned prompt (LLaVA) or gathered from the full one (Qwen2-VL)",
    "mm_encoder_outputs": "pass pixel_values; VisPruner needs the vision tower's internals, not its outputs",
    "pixel_values_videos": "video inputs are not supported by VisPruner here",
    "video_grid_thw": "video inputs are not supported by VisPruner here",
    "past_key_values": "prune a fresh prompt, before any cache exists",
}


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def _check_num_tokens(num_tokens: Any) -> int:
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


def _check_ratio(important_ratio: Any) -> float:
    if isinstance(important_ratio, bool) or not isinstance(important_ratio, numbers.Real):
        raise ValueError(f"important_ratio must be a number in [0, 1], got {important_ratio!r}")
    ratio = float(important_ratio)
    if math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"important_ratio must be in [0, 1], got {important_ratio!r}")
    return ratio


def _budgets(num_tokens: int, important_ratio: float) -> tuple[int, int]:
    important = int(num_tokens * important_ratio)
    return important, num_tokens - important


# ----------------------------------------------------------------------------------------------
# Importance signals
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


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
    """ToMe-style drop (METHODS.md §5.1 step 4) on the index list ``residual`` until ``target`` remain."""
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
    num_tokens = _check_num_tokens(num_tokens)
    important_ratio = _check_ratio(important_ratio)
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
    n_important, n_diverse = _budgets(num_tokens, important_ratio)
    order = pool[torch.argsort(importance[pool].float(), descending=True, stable=True)]
    important, residual = order[:n_important], order[n_important:]
    normed = F.normalize(features.detach().float(), dim=-1)
    diverse = _drop_near_duplicates(residual, normed, n_diverse)
    kept = torch.sort(torch.cat([important, diverse])).values
    return TokenSelection(kept=kept, important=important, diverse=diverse, num_candidates=pool.numel())


# ----------------------------------------------------------------------------------------------
# Bookkeeping returned to callers
# ----------------------------------------------------------------------------------------------


@dataclass
class ImagePruning:
    """One image: where it sits, how many tokens it had and kept, and which ones.

    ``kept_index`` indexes the image's placeholder run (= its feature rows, newline tokens included
    on LLaVA-NeXT), ascending. ``selections`` has one entry per crop (one for LLaVA-1.5 and Qwen2-VL)
    with indices into that crop's patch tokens (Qwen2-VL: merged tokens); ``importance`` matches.
    """

    sample: int
    original_tokens: int
    kept_index: torch.Tensor
    selections: list[TokenSelection]
    importance: list[torch.Tensor]

    @property
    def kept_tokens(self) -> int:
        return int(self.kept_index.numel())


@dataclass
class PruneInfo:
    """What :func:`prune_visual_tokens` did to a batch (for tests, reports and FLOPs accounting)."""

    model_type: str
    num_tokens: int
    important_ratio: float
    padding_side: str
    images: list[ImagePruning]
    visual_tokens_before: list[int]
    visual_tokens_after: list[int]
    notes: list[str] = field(default_factory=list)

    def exit_plan(self, sample: int, exit_layer: int | None = None) -> ExitPlan:
        """FLOPs plan of one sample (``flops.prefill_flops(dims, n_text, visual_tokens_before[s], plan)``)."""
        return ExitPlan(exit_layer=exit_layer, kept_visual_tokens=self.visual_tokens_after[sample])


# ----------------------------------------------------------------------------------------------
# Model plumbing
# ----------------------------------------------------------------------------------------------


def _unwrap(model: Any) -> Any:
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _model_type(model: Any) -> str:
    model_type = getattr(model.config, "model_type", None)
    if model_type in ("llava", "llava_next", "qwen2_vl"):
        return model_type
    if model_type == "qwen2_5_vl":
        raise NotImplementedError(
            "VisPruner is not implemented for Qwen2.5-VL (qwen2_5_vl): its windowed vision attention permutes "
            "the patches, and that permutation is not undone here yet. Supported: llava, llava_next, qwen2_vl."
        )
    raise UnsupportedModelError(
        f"VisPruner supports LLaVA-1.5 (llava), LLaVA-NeXT (llava_next) and Qwen2-VL (qwen2_vl); "
        f"got model_type {model_type!r} ({type(model).__name__})"
    )


def _clip_layers(vision_tower: Any) -> Any:
    """Encoder layers of a CLIP vision tower, after checking it really has a [CLS] token."""
    inner = getattr(vision_tower, "vision_model", vision_tower)
    embeddings = getattr(inner, "embeddings", None)
    encoder = getattr(inner, "encoder", None)
    if embeddings is None or not hasattr(embeddings, "class_embedding") or encoder is None:
        raise NotImplementedError(
            f"VisPruner's [CLS]-attention importance needs a CLIP-style vision tower with a [CLS] token; "
            f"got {type(vision_tower).__name__}. Towers without [CLS] (e.g. SigLIP) need the received-"
            "attention fallback, which is implemented for Qwen2-VL only."
        )
    return encoder.layers


def _clip_feature_layer(config: Any) -> int:
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise NotImplementedError(
            f"VisPruner needs a single vision_feature_layer (an int); got {layer!r}. Which layer's [CLS] "
            "attention should rank tokens is undefined for concatenated layers."
        )
    if config.vision_feature_select_strategy != "default":
        raise NotImplementedError(
            "VisPruner needs vision_feature_select_strategy='default' (patch tokens only, [CLS] dropped); "
            f"got {config.vision_feature_select_strategy!r}"
        )
    return layer


def _clip_signals(
    base: Any, config: Any, image_features: Any
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Importance [crops, P] and patch features [crops, P, D] from a get_image_features output."""
    hidden_states = image_features.hidden_states
    layers = _clip_layers(base.vision_tower)
    selected = _clip_feature_layer(config) % len(hidden_states)
    if selected == 0:
        raise NotImplementedError(
            "vision_feature_layer selects the embeddings (before any encoder layer): there is no [CLS] "
            "attention to rank tokens with"
        )
    importance = cls_attention_importance(layers[selected - 1], hidden_states[selected - 1])
    features = hidden_states[selected][:, 1:].detach()
    return image_features.pooler_output, importance, features


def _image_token_id(config: Any) -> int:
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if token is None:
        raise ValueError(f"{type(config).__name__} has no image_token_id")
    return int(token)


@dataclass
class _Encoded:
    """Pruned features and per-image kept indices, before the prompt is rewritten."""

    features: list[torch.Tensor]  # kept feature rows per image
    original: list[int]  # feature rows per image before pruning
    kept_index: list[torch.Tensor]
    selections: list[list[TokenSelection]]
    importance: list[list[torch.Tensor]]

    def add(
        self,
        features: torch.Tensor,
        kept_index: torch.Tensor,
        selections: list[TokenSelection],
        importance: list[torch.Tensor],
    ) -> None:
        """One image: its unpruned feature rows, the rows kept, and how they were chosen."""
        self.features.append(features[kept_index])
        self.original.append(features.shape[0])
        self.kept_index.append(kept_index)
        self.selections.append(selections)
        self.importance.append(importance)


def _warn_no_pruning(notes: list[str], num_tokens: int, count: int, what: str) -> None:
    note = (
        f"VisPruner: num_tokens={num_tokens} is larger than the {count} tokens of {what}; "
        "it is kept in full (no pruning)"
    )
    if note not in notes:
        notes.append(note)
        warnings.warn(note, stacklevel=4)  # the caller of prune_visual_tokens


def _encode_llava(model: Any, inputs: Mapping[str, Any], num_tokens: int, ratio: float, notes: list[str]):
    base, config = model.model, model.config
    out = base.get_image_features(
        pixel_values=inputs["pixel_values"],
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        output_hidden_states=True,
        return_dict=True,
    )
    pooled, importance, features = _clip_signals(base, config, out)
    enc = _Encoded([], [], [], [], [])
    for i, feats in enumerate(pooled):
        if num_tokens > feats.shape[0]:
            _warn_no_pruning(notes, num_tokens, feats.shape[0], "an image")
        sel = select_visual_tokens(importance[i], features[i], num_tokens, ratio)
        enc.add(feats, sel.kept, [sel], [importance[i]])
    return enc


def _encode_llava_next(
    model: Any, inputs: Mapping[str, Any], num_tokens: int, ratio: float, notes: list[str]
):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    base, config = model.model, model.config
    image_sizes = inputs.get("image_sizes")
    if image_sizes is None:
        raise ValueError("LLaVA-NeXT inputs need image_sizes next to pixel_values")
    out = base.get_image_features(
        inputs["pixel_values"],
        image_sizes,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        output_hidden_states=True,
        return_dict=True,
    )
    pooled, importance, features = _clip_signals(base, config, out)
    crops, patches = importance.shape
    crops_per_image = [
        image_size_to_num_patches(
            image_size=size,
            grid_pinpoints=config.image_grid_pinpoints,
            patch_size=config.vision_config.image_size,
        )
        for size in image_sizes
    ]
    if sum(crops_per_image) != crops:
        raise ValueError(f"{crops} crops were encoded but image_sizes imply {sum(crops_per_image)}")
    # Lay out crop-token ids exactly as the model lays out features: the model's own packing (anyres
    # rearrangement, unpadding, newline column) applied to ids, with -1 marking newline tokens.
    ids = torch.arange(crops * patches, dtype=torch.float64, device=importance.device).view(crops, patches, 1)
    packed_ids, _ = base.pack_image_features(
        list(torch.split(ids, crops_per_image)),
        image_sizes,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_newline=torch.full((1,), -1.0, dtype=torch.float64, device=importance.device),
    )
    packed_ids = [p[:, 0].round().long() for p in packed_ids]
    survives = torch.zeros(crops * patches, dtype=torch.bool, device=importance.device)
    for p in packed_ids:
        survives[p[p >= 0]] = True
    survives = survives.view(crops, patches)

    enc = _Encoded([], [], [], [], [])
    first = 0
    for i, n_crops in enumerate(crops_per_image):
        keep_ids = torch.zeros(crops * patches, dtype=torch.bool, device=importance.device)
        sels, imps = [], []
        for c in range(first, first + n_crops):
            if num_tokens > patches:
                _warn_no_pruning(notes, num_tokens, patches, "a LLaVA-NeXT crop")
            sel = select_visual_tokens(importance[c], features[c], num_tokens, ratio, candidates=survives[c])
            keep_ids[c * patches + sel.kept] = True
            sels.append(sel)
            imps.append(importance[c])
        layout = packed_ids[i]
        keep = (layout < 0) | keep_ids[layout.clamp(min=0)]
        kept_index = keep.nonzero().squeeze(1)
        if pooled[i].shape[0] != layout.numel():
            raise RuntimeError(
                f"image {i}: {pooled[i].shape[0]} features but a layout of {layout.numel()} tokens"
            )
        enc.add(pooled[i], kept_index, sels, imps)
        first += n_crops
    return enc


def _encode_qwen2_vl(model: Any, inputs: Mapping[str, Any], num_tokens: int, ratio: float, notes: list[str]):
    base = model.model
    visual = base.visual
    grid_thw = inputs.get("image_grid_thw")
    if grid_thw is None:
        raise ValueError("Qwen2-VL inputs need image_grid_thw next to pixel_values")
    captured: dict[str, Any] = {}

    def grab(_module: Any, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["cu_seqlens"] = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        captured["position_embeddings"] = kwargs.get("position_embeddings")

    handle = visual.blocks[-1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = base.get_image_features(inputs["pixel_values"], grid_thw, return_dict=True)
    finally:
        handle.remove()
    if captured.get("cu_seqlens") is None or captured.get("position_embeddings") is None:
        raise RuntimeError("could not capture the last Qwen2-VL vision block's inputs")
    importance = received_attention_importance(
        visual.blocks[-1],
        captured["hidden"],
        captured["cu_seqlens"],
        captured["position_embeddings"],
        visual.spatial_merge_size,
    )
    enc = _Encoded([], [], [], [], [])
    for i, feats in enumerate(out.pooler_output):
        if importance[i].shape[0] != feats.shape[0]:
            raise RuntimeError(
                f"image {i}: {feats.shape[0]} merged tokens but {importance[i].shape[0]} importance groups"
            )
        if num_tokens > feats.shape[0]:
            _warn_no_pruning(notes, num_tokens, feats.shape[0], "an image")
        sel = select_visual_tokens(importance[i], feats.detach(), num_tokens, ratio)
        enc.add(feats, sel.kept, [sel], [importance[i]])
    return enc


# ----------------------------------------------------------------------------------------------
# Prompt rewriting
# ----------------------------------------------------------------------------------------------


def _padding_side(mask: torch.Tensor) -> str:
    """'left' or 'right' from a 0/1 mask [B, N]; rows without padding fit either side."""
    m = mask.bool()
    left = bool((m[:, 1:] >= m[:, :-1]).all())  # 0...0 1...1
    right = bool((m[:, 1:] <= m[:, :-1]).all())  # 1...1 0...0
    if left:
        return "left"
    if right:
        return "right"
    raise ValueError(
        "attention_mask must be contiguous left or right padding (one side for the whole batch); "
        "holes inside a row, or left- and right-padded rows mixed, are not supported"
    )


def _assign_images(
    is_image: torch.Tensor, valid: torch.Tensor, counts: Sequence[int]
) -> tuple[list[int], list[torch.Tensor]]:
    """Give each image its placeholder positions: image k takes the next ``counts[k]`` image tokens in
    row-major order, the same order in which the model scatters feature rows."""
    per_sample = [(img & ok).nonzero().squeeze(1) for img, ok in zip(is_image, valid, strict=True)]
    available = [int(p.numel()) for p in per_sample]

    def mismatch(detail: str) -> ValueError:
        return ValueError(
            f"{detail} (image tokens per sample: {available}, feature rows per image: {list(counts)}); "
            "were the prompts truncated, or built for other images?"
        )

    owners: list[int] = []
    slots: list[torch.Tensor] = []
    used = [0] * len(per_sample)
    sample = 0
    for k, count in enumerate(counts):
        while sample < len(per_sample) and used[sample] == available[sample]:
            sample += 1
        if sample == len(per_sample) or used[sample] + count > available[sample]:
            raise mismatch(f"image {k} needs {count} placeholder tokens that the prompt does not have")
        owners.append(sample)
        slots.append(per_sample[sample][used[sample] : used[sample] + count])
        used[sample] += count
    if used != available:
        raise mismatch("some samples have more image tokens than their images produce features")
    return owners, slots


def _repack(tensor: torch.Tensor, keep: torch.Tensor, pad_value: int, side: str) -> torch.Tensor:
    lengths = keep.sum(dim=1)
    width = int(lengths.max()) if lengths.numel() else 0
    out = tensor.new_full((tensor.shape[0], width), pad_value)
    for b in range(tensor.shape[0]):
        values = tensor[b][keep[b]]
        if side == "left":
            out[b, width - values.numel() :] = values
        else:
            out[b, : values.numel()] = values
    return out


def _repack_positions(positions: torch.Tensor, keep: torch.Tensor, side: str) -> torch.Tensor:
    """Gather [3, B, N] M-RoPE ids at kept positions and re-pad (0 at padding, like get_rope_index)."""
    rows = [_repack(positions[r], keep, 0, side) for r in range(positions.shape[0])]
    return torch.stack(rows, dim=0)


def _pad_token_id(model: Any, input_ids: torch.Tensor, valid: torch.Tensor) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config.get_text_config(), "pad_token_id", None)
    if pad is None and bool((~valid).any()):
        pad = int(input_ids[~valid][0])
    return 0 if pad is None else int(pad)


def prune_visual_tokens(
    model: Any,
    inputs: Mapping[str, Any],
    num_tokens: int,
    important_ratio: float = 0.5,
    *,
    return_info: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], PruneInfo]:
    """Model inputs in which every image keeps at most ``num_tokens`` visual tokens (VisPruner).

    ``inputs`` are ordinary processor / ``tiny_inputs`` outputs (``input_ids``, ``attention_mask``,
    ``pixel_values`` and the family's extras). The result is accepted unchanged by ``model(**out)``
    and ``model.generate(**out)``, on a batch with left (or right, for forward) padding and any number
    of images per sample: the pruned features travel as ``mm_encoder_outputs`` and each image's
    placeholder run is shortened to its kept count. Keys that are not model tensors (e.g. a
    collator's ``answers``) pass through unchanged. With ``return_info=True`` a :class:`PruneInfo`
    comes along. Grad mode is the caller's: under autograd the kept features stay differentiable.
    """
    num_tokens = _check_num_tokens(num_tokens)
    important_ratio = _check_ratio(important_ratio)
    model = _unwrap(model)
    model_type = _model_type(model)
    for key, why in _REJECTED_KEYS.items():
        if inputs.get(key) is not None:
            raise ValueError(f"prune_visual_tokens does not accept {key!r}: {why}")
    input_ids = inputs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("prune_visual_tokens needs input_ids [batch, seq] (a tensor)")
    mask = inputs.get("attention_mask")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    side = _padding_side(valid)
    image_token = _image_token_id(model.config)
    is_image = input_ids == image_token
    notes: list[str] = []

    batch = input_ids.shape[0]
    out = {k: v for k, v in inputs.items() if k not in _CONSUMED_KEYS}
    before = (is_image & valid).sum(dim=1).tolist()
    if inputs.get("pixel_values") is None:
        if bool((is_image & valid).any()):
            raise ValueError("input_ids contain image tokens but no pixel_values were given")
        info = PruneInfo(model_type, num_tokens, important_ratio, side, [], before, before, notes)
        return (out, info) if return_info else out

    encoders = {"llava": _encode_llava, "llava_next": _encode_llava_next, "qwen2_vl": _encode_qwen2_vl}
    enc = encoders[model_type](model, inputs, num_tokens, important_ratio, notes)
    owners, slots = _assign_images(is_image, valid, enc.original)

    keep = valid & ~is_image
    images = []
    for k, (owner, run) in enumerate(zip(owners, slots, strict=True)):
        kept_slots = run[enc.kept_index[k].to(run.device)]
        keep[owner, kept_slots] = True
        images.append(
            ImagePruning(owner, enc.original[k], enc.kept_index[k], enc.selections[k], enc.importance[k])
        )

    pad_id = _pad_token_id(model, input_ids, valid)
    for key, pad in _PER_TOKEN_KEYS.items():
        value = inputs.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or tuple(value.shape[:2]) != tuple(input_ids.shape):
            raise ValueError(f"{key!r} must be a tensor shaped like input_ids {tuple(input_ids.shape)}")
        out[key] = _repack(value, keep, pad_id if pad is None else pad, side)
    if mask is None:
        out["attention_mask"] = _repack(valid.long(), keep, 0, side)

    if model_type == "qwen2_vl":
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = is_image.to(torch.int32)
        full_positions, _ = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=types,
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=valid.long(),
        )
        out["position_ids"] = _repack_positions(full_positions, keep, side)
        if "mm_token_type_ids" not in out:
            out["mm_token_type_ids"] = _repack(types, keep, 0, side)

    out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(enc.features))}
    after = (out["input_ids"] == image_token).logical_and(out["attention_mask"].bool()).sum(dim=1).tolist()
    expected = [0] * batch
    for image in images:
        expected[image.sample] += image.kept_tokens
    if after != expected:
        raise RuntimeError(
            f"internal error: kept image tokens per sample {after} != kept features {expected}"
        )
    info = PruneInfo(model_type, num_tokens, important_ratio, side, images, before, after, notes)
    return (out, info) if return_info else out


# ----------------------------------------------------------------------------------------------
# Strategy object
# ----------------------------------------------------------------------------------------------


class VisPruner:
    """VisPruner as a strategy: ``prepare(model, inputs)`` rewrites a batch before the model sees it.

    ``num_tokens`` (T) is the number of visual tokens kept per image (per crop on LLaVA-NeXT, where
    image-newline tokens come on top); ``important_ratio`` (r) the share of T chosen by [CLS]
    importance, the rest by diversity. The paper's settings are T in {128, 64, 32} with r = 0.5.
    ``last_info`` holds the :class:`PruneInfo` of the latest ``prepare`` call.
    """

    name = "vispruner"

    def __init__(self, num_tokens: int, important_ratio: float = 0.5) -> None:
        self.num_tokens = _check_num_tokens(num_tokens)
        self.important_ratio = _check_ratio(important_ratio)
        self.last_info: PruneInfo | None = None

    @property
    def important_tokens(self) -> int:
        return _budgets(self.num_tokens, self.important_ratio)[0]

    @property
    def diverse_tokens(self) -> int:
        return _budgets(self.num_tokens, self.important_ratio)[1]

    def prepare(self, model: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
        new_inputs, info = prune_visual_tokens(
            model, inputs, self.num_tokens, self.important_ratio, return_info=True
        )
        self.last_info = info
        return new_inputs

    def flops_plan(
        self, n_visual: int | None = None, *, num_images: int = 1, exit_layer: int | None = None
    ) -> ExitPlan:
        """Prefill FLOPs plan (``vtw_train.flops``) for a prompt with ``num_images`` images holding
        ``n_visual`` visual tokens in all: ``min(n_visual, T * num_images)`` enter the LLM, and
        ``exit_layer`` adds VTW on top (METHODS.md §11). Exact for LLaVA-1.5 (equal-sized images);
        for LLaVA-NeXT and Qwen2-VL use ``last_info.exit_plan(sample)``, which counts what was kept."""
        if isinstance(num_images, bool) or not isinstance(num_images, numbers.Integral) or num_images < 0:
            raise ValueError(f"num_images must be an integer >= 0, got {num_images!r}")
        kept = self.num_tokens * int(num_images)
        if n_visual is not None:
            if isinstance(n_visual, bool) or not isinstance(n_visual, numbers.Integral) or n_visual < 0:
                raise ValueError(f"n_visual must be an integer >= 0, got {n_visual!r}")
            kept = min(int(n_visual), kept)
        return ExitPlan(exit_layer=exit_layer, kept_visual_tokens=kept)

    def describe(self) -> dict[str, Any]:
        """Settings for reports and run metadata."""
        return {
            "method": self.name,
            "num_tokens": self.num_tokens,
            "important_ratio": self.important_ratio,
            "important_tokens": self.important_tokens,
            "diverse_tokens": self.diverse_tokens,
            "diversity_step": DIVERSITY_STEP,
            "scope": "per image; per crop on LLaVA-NeXT (newline tokens kept); after the merger on Qwen2-VL",
            "positions": "compacted (LLaVA, LLaVA-NeXT); original M-RoPE ids of kept tokens (Qwen2-VL)",
        }

    def __repr__(self) -> str:
        return f"VisPruner(num_tokens={self.num_tokens}, important_ratio={self.important_ratio})"
