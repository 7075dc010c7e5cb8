"""Per-family encoding for VisPruner: image features, importance signals and the kept rows per image.

Each supported ``model_type`` registers an encoder in :data:`ENCODERS`; an encoder runs the
model's own ``get_image_features`` (so kept features are bit-identical to the stock forward's
when every token is kept), computes the importance signal, selects per image (per crop on
LLaVA-NeXT) and returns the kept feature rows. Everything after that (rewriting the prompt) is
family-independent, except Qwen2-VL's M-RoPE positions.

LLaVA-NeXT: each crop keeps T tokens. With the ``reference`` budget (VisPruner's own code) they
are chosen among all of the crop's tokens and anyres unpadding then drops those in the letterbox
padding, so at most T reach the LLM; with ``surviving`` they are chosen among the tokens that
survive unpadding, so exactly T do. Image-newline tokens are always kept. The layout comes from the model's own
``pack_image_features``, so the kept features and the kept slots line up exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import UnsupportedModelError
from .selection import (
    TokenSelection,
    cls_attention_importance,
    received_attention_importance,
    select_visual_tokens,
)


def model_type_of(model: Any) -> str:
    model_type = getattr(model.config, "model_type", None)
    if model_type in ENCODERS:
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


@dataclass
class EncodedImages:
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


def _encode_llava(
    model: Any,
    inputs: Mapping[str, Any],
    num_tokens: int,
    ratio: float,
    notes: list[str],
    budget: str,
    select: Any = select_visual_tokens,
):
    base, config = model.model, model.config
    out = base.get_image_features(
        pixel_values=inputs["pixel_values"],
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        output_hidden_states=True,
        return_dict=True,
    )
    pooled, importance, features = _clip_signals(base, config, out)
    enc = EncodedImages([], [], [], [], [])
    for i, feats in enumerate(pooled):
        if num_tokens > feats.shape[0]:
            _warn_no_pruning(notes, num_tokens, feats.shape[0], "an image")
        sel = select(importance[i], features[i], num_tokens, ratio)
        enc.add(feats, sel.kept, [sel], [importance[i]])
    return enc


def _encode_llava_next(
    model: Any,
    inputs: Mapping[str, Any],
    num_tokens: int,
    ratio: float,
    notes: list[str],
    budget: str,
    select: Any = select_visual_tokens,
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

    enc = EncodedImages([], [], [], [], [])
    first = 0
    for i, n_crops in enumerate(crops_per_image):
        keep_ids = torch.zeros(crops * patches, dtype=torch.bool, device=importance.device)
        sels, imps = [], []
        for c in range(first, first + n_crops):
            if num_tokens > patches:
                _warn_no_pruning(notes, num_tokens, patches, "a LLaVA-NeXT crop")
            # "reference": T among all of the crop's tokens, then unpadding drops some (at most T kept, as
            # VisPruner's code does); "surviving": T among the tokens that survive unpadding (exactly T).
            pool = survives[c] if budget == "surviving" else None
            sel = select(importance[c], features[c], num_tokens, ratio, candidates=pool)
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


def _encode_qwen2_vl(
    model: Any,
    inputs: Mapping[str, Any],
    num_tokens: int,
    ratio: float,
    notes: list[str],
    budget: str,
    select: Any = select_visual_tokens,
):
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
    enc = EncodedImages([], [], [], [], [])
    for i, feats in enumerate(out.pooler_output):
        if importance[i].shape[0] != feats.shape[0]:
            raise RuntimeError(
                f"image {i}: {feats.shape[0]} merged tokens but {importance[i].shape[0]} importance groups"
            )
        if num_tokens > feats.shape[0]:
            _warn_no_pruning(notes, num_tokens, feats.shape[0], "an image")
        sel = select(importance[i], feats.detach(), num_tokens, ratio)
        enc.add(feats, sel.kept, [sel], [importance[i]])
    return enc


Encoder = Callable[[Any, Mapping[str, Any], int, float, list[str], str], EncodedImages]

#: model_type -> encoder. Adding a family is one function and one entry here.
ENCODERS: dict[str, Encoder] = {
    "llava": _encode_llava,
    "llava_next": _encode_llava_next,
    "qwen2_vl": _encode_qwen2_vl,
}
