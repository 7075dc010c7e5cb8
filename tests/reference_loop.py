"""Slow, hand-written reference for visual-token withdrawal, used to check the engine.

Why a second implementation: the engine replaces the decoder's forward and reuses transformers'
mask builders and caches, so a bug there could agree with itself. This reference shares none of
that machinery. It merges the visual features itself, builds its own float causal masks, runs the
decoder layers in an explicit Python loop without any cache, and withdraws by plain indexing. It
handles one unpadded sample only, which is all an oracle needs, and imports nothing from
``vtw_train`` except the tiny model builders' id conventions (via the model config).

Semantics of withdrawal at layer K (docs/engine.md, docs/methods.md section 1): layers 0..K-1 see every
token; immediately before layer K the visual positions are removed from the hidden states and from
the rotary (cos, sin) tables, and layers K..L-1 run causal attention over the remaining tokens,
which keep their ORIGINAL position ids (a gap where the image was).

It calls only the embedding table, ``get_image_features``, ``get_rope_index``, the rotary module,
the decoder layers, the final norm and ``lm_head`` -- never the decoder's or the wrapper's
``forward`` -- so it stays valid on a model whose decoder forward the engine has replaced, and on
a peft-wrapped model (LoRA layers included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "merged_inputs_embeds",
    "position_ids_for",
    "reference_greedy",
    "reference_logits",
    "visual_positions",
    "with_tokens",
]


def with_tokens(sample: dict[str, Any], tokens: torch.Tensor) -> dict[str, Any]:
    """``sample`` (one unpadded row) with ``tokens`` (1-D, text ids) appended, as the reference reads it."""
    out = dict(sample)
    n = tokens.numel()
    out["input_ids"] = torch.cat([sample["input_ids"], tokens.view(1, -1)], dim=1)
    out["attention_mask"] = torch.cat([sample["attention_mask"], sample["attention_mask"].new_ones(1, n)], 1)
    if "mm_token_type_ids" in sample:
        types = sample["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, n)], dim=1)
    return out


def _unwrap(model: Any) -> Any:
    """A peft ``PeftModel`` keeps the task model (with its LoRA layers injected) one level down;
    the reference walks the task model's modules directly, adapters included."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _is_qwen(model: Any) -> bool:
    return model.config.model_type in ("qwen2_vl", "qwen2_5_vl")


def visual_positions(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask of positions that carry visual features (image token, plus video on Qwen)."""
    visual = input_ids == model.config.image_token_id
    video = getattr(model.config, "video_token_id", None)
    if video is not None:
        visual |= input_ids == video
    return visual


def _check_single_unpadded(inputs: dict[str, Any]) -> torch.Tensor:
    input_ids = inputs["input_ids"]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"the reference handles one sample (batch 1); got input_ids {tuple(input_ids.shape)}"
        )
    mask = inputs.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        raise ValueError("the reference handles unpadded samples only")
    return input_ids


def merged_inputs_embeds(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """Token embeddings with the projected image features written over the image placeholders, in
    order. Done here rather than by the wrapper's forward so the reference does not depend on how the
    wrapper hands ``inputs_embeds`` to the decoder."""
    model = _unwrap(model)
    input_ids = _check_single_unpadded(inputs)
    embeds = model.get_input_embeddings()(input_ids)
    pixel_values = inputs.get("pixel_values")
    if pixel_values is None:
        return embeds
    config = model.config
    model_type = config.model_type
    if model_type == "llava":
        out = model.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        )
    elif model_type == "llava_next":
        out = model.model.get_image_features(
            pixel_values,
            inputs["image_sizes"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        )
    elif _is_qwen(model):
        out = model.model.get_image_features(pixel_values, inputs["image_grid_thw"], return_dict=True)
    else:
        raise NotImplementedError(f"reference: unsupported model_type {model_type!r}")
    features = torch.cat(list(out.pooler_output), dim=0).to(embeds.dtype)
    image_slots = input_ids == config.image_token_id
    if int(image_slots.sum()) != features.shape[0]:
        raise ValueError(
            f"{int(image_slots.sum())} image tokens in input_ids but {features.shape[0]} image features"
        )
    # Same ordering rule the models use: the k-th image slot receives the k-th feature row.
    embeds = embeds.clone()
    embeds[image_slots] = features
    return embeds


def position_ids_for(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """Position ids of the full (unwithdrawn) sequence: [1, n] for LLaVA, [3, 1, n] M-RoPE for Qwen."""
    model = _unwrap(model)
    input_ids = _check_single_unpadded(inputs)
    n = input_ids.shape[1]
    plain = torch.arange(n, device=input_ids.device)[None]
    if not _is_qwen(model):
        return plain
    if inputs.get("image_grid_thw") is None:
        return plain[None].expand(3, 1, n)
    # Token types are derived from the ids, not taken from the inputs, so a wrong
    # ``mm_token_type_ids`` from an input builder cannot leak into the reference.
    types = (input_ids == model.config.image_token_id).long()
    video = getattr(model.config, "video_token_id", None)
    if video is not None:
        types = types + 2 * (input_ids == video).long()
    positions, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=types,
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
    )
    return positions


def _causal_float_mask(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive [1, 1, n, n] mask: 0 where key j <= query i, the dtype's minimum elsewhere."""
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(n, n, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@torch.no_grad()
def reference_logits(
    model: Any,
    inputs: dict[str, Any],
    exit_layer: int | None,
    prune: tuple[int, Callable[..., torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the non-visual positions of one unpadded sample with withdrawal before
    ``exit_layer`` (None or L: no withdrawal; 0: the decoder never sees visual tokens).

    ``prune = (P, choose)``: before layer P (if it comes before the exit), drop the visual tokens
    that ``choose(layer P-1, its input hidden, cos, sin, visual [1, n] bool)`` does not keep
    (``[n]`` bool): FastV followed by an exit. The choice itself is the caller's.

    Returns ``(logits [1, n_text, vocab], text_index [n_text])`` where ``text_index`` holds the
    positions of the non-visual tokens in ``input_ids``.
    """
    model = _unwrap(model)
    input_ids = _check_single_unpadded(inputs)
    language_model = model.model.language_model
    text_config = language_model.config
    layers = language_model.layers
    num_layers = len(layers)
    k = num_layers if exit_layer is None else int(exit_layer)
    if not 0 <= k <= num_layers:
        raise ValueError(f"exit_layer must be in [0, {num_layers}] or None, got {exit_layer}")
    if getattr(text_config, "sliding_window", None) is not None:
        raise NotImplementedError(
            "the reference builds plain causal masks; sliding-window layers are not supported"
        )

    hidden = merged_inputs_embeds(model, inputs)
    positions = position_ids_for(model, inputs)
    cos, sin = language_model.rotary_emb(hidden, positions)
    text_index = torch.nonzero(~visual_positions(model, input_ids[0]), as_tuple=False).flatten()

    qwen = _is_qwen(model)
    # The stock Llama/Mistral/Qwen2 loop hands layers the 2D position ids; Qwen2-VL's hands them the
    # text-only row, which is None for an ordinary (non-packed) call. Mirror both.
    layer_positions = None if qwen else positions
    mask = _causal_float_mask(hidden.shape[1], hidden.dtype, hidden.device)

    is_visual = visual_positions(model, input_ids[0])
    current = torch.arange(hidden.shape[1], device=hidden.device)  # the original positions still present
    before_prune = None
    for i, layer in enumerate(layers):
        drop = None
        if prune is not None and i == prune[0] - 1:
            before_prune = (layer, hidden, cos, sin)
        if prune is not None and i == prune[0] and i < k:
            keep = prune[1](*before_prune, is_visual[current].unsqueeze(0))
            drop = is_visual[current] & ~keep
        if i == k:
            drop = is_visual[current]
        if drop is not None:
            kept = torch.nonzero(~drop, as_tuple=False).flatten()
            hidden = hidden[:, kept]
            cos, sin = cos[:, kept], sin[:, kept]
            if layer_positions is not None:
                layer_positions = layer_positions[:, kept]
            current = current[kept]
            mask = _causal_float_mask(hidden.shape[1], hidden.dtype, hidden.device)
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=(cos, sin),
            position_ids=layer_positions,
            past_key_values=None,
            use_cache=False,
        )
    hidden = hidden[:, torch.nonzero(~is_visual[current], as_tuple=False).flatten()]
    logits = model.lm_head(language_model.norm(hidden))
    return logits, text_index


def _append_token(model: Any, inputs: dict[str, Any], token: int) -> dict[str, Any]:
    new = dict(inputs)
    ids = inputs["input_ids"]
    new["input_ids"] = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    for key in ("attention_mask", "mm_token_type_ids"):
        if inputs.get(key) is not None:
            value = 1 if key == "attention_mask" else 0
            new[key] = torch.cat([inputs[key], inputs[key].new_full((1, 1), value)], dim=1)
    return new


@torch.no_grad()
def reference_greedy(
    model: Any,
    inputs: dict[str, Any],
    exit_layer: int | None,
    max_new_tokens: int,
    *,
    suppress_tokens: list[int] | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy continuation without a KV cache: each step reruns ``reference_logits`` on the grown
    sequence and takes the argmax at the last position. Returns the new ids, shape [1, n_new].

    Matches stock ``generate(do_sample=False)`` on a batch of one: tokens in ``suppress_tokens``
    (default: the model's generation config) are never chosen, and generation stops after the
    EOS token (default: the generation config's).
    """
    model = _unwrap(model)
    generation_config = getattr(model, "generation_config", None)
    if suppress_tokens is None and generation_config is not None:
        suppress_tokens = list(generation_config.suppress_tokens or [])
    if eos_token_id is None and generation_config is not None:
        eos = generation_config.eos_token_id
        eos_token_id = eos[0] if isinstance(eos, list) else eos
    _check_single_unpadded(inputs)
    if bool(visual_positions(model, inputs["input_ids"][0, -1:]).any()):
        raise ValueError("the prompt must end with a text token: a withdrawn last position has no logits")
    current = dict(inputs)
    new_tokens: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = reference_logits(model, current, exit_layer)
        last = logits[0, -1].clone()
        if suppress_tokens:
            last[list(suppress_tokens)] = float("-inf")
        token = int(last.argmax())
        new_tokens.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        current = _append_token(model, current, token)
    return torch.tensor([new_tokens], dtype=torch.long, device=inputs["input_ids"].device)
