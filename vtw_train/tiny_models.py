"""Tiny random multimodal models and matching inputs, built entirely from configs in code.

Why this module exists: the withdrawal engine must be checked on every backbone it claims to support
(LLaVA on Llama / Mistral / Qwen2, LLaVA-NeXT anyres, Qwen2-VL, Qwen2.5-VL) without network access to
a model hub and within a CPU test budget. Real checkpoints are not needed for that: the engine's
contract is exactness against the stock forward, which random weights exercise as well as trained
ones do. Everything here is deterministic for a seed and small enough that a forward pass takes
milliseconds on one CPU core.

The models keep the real architectures' *shape* properties that matter to withdrawal: grouped-query
attention, multi-image prompts, anyres image-newline tokens whose count depends on the image size,
and Qwen2-VL's 3D M-RoPE position ids with vision start/end markers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MistralConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

__all__ = [
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "FAMILIES",
    "FIRST_TEXT_TOKEN_ID",
    "IMAGE_TOKEN_ID",
    "PAD_TOKEN_ID",
    "VIDEO_TOKEN_ID",
    "VISION_END_TOKEN_ID",
    "VISION_START_TOKEN_ID",
    "VOCAB_SIZE",
    "default_image_sizes",
    "llava_next_num_image_tokens",
    "num_image_tokens",
    "tiny_inputs",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_model",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
    "unbatch",
    "visual_token_mask",
]

# One shared id layout for every family, so tests can reason about ids without asking the model.
# Random text is drawn from [FIRST_TEXT_TOKEN_ID, VOCAB_SIZE) and therefore never hits a special id.
VOCAB_SIZE = 256
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
IMAGE_TOKEN_ID = 3
VIDEO_TOKEN_ID = 4
VISION_START_TOKEN_ID = 5
VISION_END_TOKEN_ID = 6
FIRST_TEXT_TOKEN_ID = 8

# Text-side defaults. initializer_range is larger than the usual 0.02 on purpose: with 0.02 a tiny
# random model's logits are nearly flat, greedy argmax gaps fall to ~1e-4 and comparisons between
# attention backends become flaky; visual tokens would also barely move the text logits, which
# would make "withdrawal changed nothing" indistinguishable from "withdrawal is wrong".
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.1,
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "tie_word_embeddings": False,
}

# CLIP tower shared by LLaVA and LLaVA-NeXT: 28 px images in 7 px patches -> a 4 x 4 grid plus CLS.
_CLIP_IMAGE_SIZE = 28
_CLIP_PATCH_SIZE = 7
# Qwen2-VL pixels are given in (H, W) multiples of patch * merge = 14.
_QWEN_PATCH_SIZE = 7
_QWEN_MERGE_SIZE = 2
_QWEN_TEMPORAL_PATCH_SIZE = 2
# Anyres layouts (height, width). Several layouts so that wide, tall and square images select
# different crop grids and therefore different numbers of visual tokens.
_NEXT_GRID_PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84]]

FAMILIES = ("llava", "llava-mistral", "llava-qwen2", "llava_next", "qwen2_vl", "qwen2_5_vl")


def _clip_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=_CLIP_IMAGE_SIZE,
        patch_size=_CLIP_PATCH_SIZE,
        projection_dim=32,
        initializer_range=0.1,
    )


def _text_kwargs(num_layers: int, hidden_size: int, overrides: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(_TEXT_DEFAULTS)
    kwargs.update(num_hidden_layers=num_layers, hidden_size=hidden_size)
    kwargs.update(overrides)
    return kwargs


def _build(model_cls: type[PreTrainedModel], config: Any, attn_implementation: str, seed: int) -> Any:
    """Instantiate under a forked RNG so that building a model neither depends on nor disturbs the
    caller's global random state (tests build several models in one process, in any order)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    model.eval()
    # Decoding must never emit a token that the model would treat as visual (engine notes, trap 7):
    # a random lm_head otherwise picks the image token now and then. Pad is suppressed too so that a
    # pad id in generated output always means "this row had finished".
    suppress = [PAD_TOKEN_ID, IMAGE_TOKEN_ID]
    if isinstance(model, (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)):
        suppress += [VIDEO_TOKEN_ID, VISION_START_TOKEN_ID, VISION_END_TOKEN_ID]
    gen = model.generation_config
    gen.suppress_tokens = suppress
    gen.pad_token_id = PAD_TOKEN_ID
    gen.bos_token_id = BOS_TOKEN_ID
    gen.eos_token_id = EOS_TOKEN_ID
    gen.do_sample = False
    return model


def tiny_llava(
    backbone: Literal["llama", "mistral", "qwen2"] = "llama",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    **text_overrides: Any,
) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 layout (CLIP, 2-layer MLP projector, feature layer -2 without CLS): 16 visual tokens
    per 28 px image. ``backbone`` swaps the decoder, because the engine replaces the decoder's forward
    and must work for each decoder class LLaVA checkpoints ship with."""
    kwargs = _text_kwargs(num_layers, hidden_size, text_overrides)
    if backbone == "llama":
        text_config: Any = LlamaConfig(**kwargs)
    elif backbone == "mistral":
        # Sliding-window attention is out of scope for the engine (notes, trap 13): switch it off so
        # the tiny Mistral is plain causal attention like the others.
        kwargs.setdefault("sliding_window", None)
        text_config = MistralConfig(**kwargs)
    elif backbone == "qwen2":
        text_config = Qwen2Config(**kwargs)
    else:
        raise ValueError(f"unknown LLaVA backbone {backbone!r}; expected 'llama', 'mistral' or 'qwen2'")
    config = LlavaConfig(
        vision_config=_clip_config(),
        text_config=text_config,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(_CLIP_IMAGE_SIZE // _CLIP_PATCH_SIZE) ** 2,
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=False,
    )
    return _build(LlavaForConditionalGeneration, config, attn_implementation, seed)


def tiny_llava_next(
    *, num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, **text_overrides: Any
) -> LlavaNextForConditionalGeneration:
    """LLaVA-NeXT anyres with several grid pinpoints, so different image sizes give different crop
    grids, different unpadding and different numbers of image-newline tokens."""
    text_config = LlamaConfig(
        **_text_kwargs(num_layers, text_overrides.pop("hidden_size", 64), text_overrides)
    )
    config = LlavaNextConfig(
        vision_config=_clip_config(),
        text_config=text_config,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=_NEXT_GRID_PINPOINTS,
        image_seq_length=(_CLIP_IMAGE_SIZE // _CLIP_PATCH_SIZE) ** 2,
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=False,
    )
    return _build(LlavaNextForConditionalGeneration, config, attn_implementation, seed)


def _qwen_text_kwargs(num_layers: int, overrides: dict[str, Any]) -> dict[str, Any]:
    hidden_size = overrides.pop("hidden_size", 64)
    kwargs = _text_kwargs(num_layers, hidden_size, overrides)
    head_dim = hidden_size // kwargs["num_attention_heads"]
    # M-RoPE splits head_dim / 2 rotary frequencies into (t, h, w) sections; they must add up.
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    kwargs.setdefault(
        "rope_parameters", {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    )
    return kwargs


def tiny_qwen2_vl(
    *, num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, **text_overrides: Any
) -> Qwen2VLForConditionalGeneration:
    """Qwen2-VL: native-resolution ViT with 2x2 patch merging and 3D M-RoPE positions, so visual
    token counts follow the image grid and position ids are not a plain arange."""
    text = _qwen_text_kwargs(num_layers, text_overrides)
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": text["hidden_size"],
        "mlp_ratio": 2,
        "num_heads": 2,
        "patch_size": _QWEN_PATCH_SIZE,
        "spatial_merge_size": _QWEN_MERGE_SIZE,
        "temporal_patch_size": _QWEN_TEMPORAL_PATCH_SIZE,
        "initializer_range": 0.1,
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
        tie_word_embeddings=False,
    )
    return _build(Qwen2VLForConditionalGeneration, config, attn_implementation, seed)


def tiny_qwen2_5_vl(
    *, num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, **text_overrides: Any
) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL: like Qwen2-VL plus windowed vision attention (one windowed and one full block),
    whose token permutation must be undone before the merge into the text stream."""
    text = _qwen_text_kwargs(num_layers, text_overrides)
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": text["hidden_size"],
        "patch_size": _QWEN_PATCH_SIZE,
        "spatial_merge_size": _QWEN_MERGE_SIZE,
        "temporal_patch_size": _QWEN_TEMPORAL_PATCH_SIZE,
        "window_size": 2 * _QWEN_PATCH_SIZE * _QWEN_MERGE_SIZE,
        "fullatt_block_indexes": [1],
        "initializer_range": 0.1,
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
        tie_word_embeddings=False,
    )
    return _build(Qwen2_5_VLForConditionalGeneration, config, attn_implementation, seed)


def tiny_model(family: str, **kw: Any) -> PreTrainedModel:
    """Build by family name, so tests and benchmarks can be parametrised over a list of strings."""
    if family == "llava":
        return tiny_llava("llama", **kw)
    if family == "llava-mistral":
        return tiny_llava("mistral", **kw)
    if family == "llava-qwen2":
        return tiny_llava("qwen2", **kw)
    if family == "llava_next":
        return tiny_llava_next(**kw)
    if family == "qwen2_vl":
        return tiny_qwen2_vl(**kw)
    if family == "qwen2_5_vl":
        return tiny_qwen2_5_vl(**kw)
    raise ValueError(f"unknown tiny model family {family!r}; expected one of {FAMILIES}")


# ----------------------------------------------------------------------------------------------
# Visual-token accounting
# ----------------------------------------------------------------------------------------------


def _kind(model: PreTrainedModel) -> str:
    model_type = model.config.model_type
    if model_type == "llava":
        return "llava"
    if model_type == "llava_next":
        return "llava_next"
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return "qwen"
    raise ValueError(f"tiny_models does not know how to build inputs for model_type {model_type!r}")


def _best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The anyres layout LLaVA-NeXT picks: most original pixels kept, then least padding wasted."""
    best: tuple[int, int] | None = None
    best_key: tuple[int, int] | None = None
    for cand_h, cand_w in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        key = (kept, -(cand_w * cand_h - kept))
        if best_key is None or key > best_key:
            best, best_key = (int(cand_h), int(cand_w)), key
    assert best is not None
    return best


def llava_next_num_image_tokens(config: Any, image_size: tuple[int, int]) -> int:
    """Visual tokens one LLaVA-NeXT image occupies: the base (resized) view, plus the anyres crops
    unpadded back to the image's aspect ratio, plus one image-newline token per feature row.

    Kept separate from the model on purpose: tests compare this count with the number of features
    the model actually produces, so a wrong count here cannot silently agree with itself."""
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    base = side * side if config.vision_feature_select_strategy == "default" else side * side + 1
    height, width = image_size
    best_h, best_w = _best_resolution(height, width, config.image_grid_pinpoints)
    rows = side * (best_h // tile)
    cols = side * (best_w // tile)
    if width / height > cols / rows:
        # Wider than the canvas: the resized image was padded top and bottom; drop those rows.
        kept_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - kept_rows) // 2)
    else:
        kept_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - kept_cols) // 2)
    return base + rows * cols + rows


def _qwen_grid(image_size: tuple[int, int]) -> tuple[int, int, int]:
    height, width = image_size
    unit = _QWEN_PATCH_SIZE * _QWEN_MERGE_SIZE
    if height % unit or width % unit or height <= 0 or width <= 0:
        raise ValueError(
            f"Qwen2-VL tiny image sizes must be positive multiples of {unit} px, got {image_size}"
        )
    return 1, height // _QWEN_PATCH_SIZE, width // _QWEN_PATCH_SIZE


def num_image_tokens(model: PreTrainedModel, image_size: tuple[int, int] | None = None) -> int:
    """Number of image-token placeholders one image of ``image_size`` (height, width) needs."""
    kind = _kind(model)
    if kind == "llava":
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        return side * side if model.config.vision_feature_select_strategy == "default" else side * side + 1
    if image_size is None:
        image_size = default_image_sizes(model)[0]
    if kind == "llava_next":
        return llava_next_num_image_tokens(model.config, image_size)
    t, h, w = _qwen_grid(image_size)
    return t * h * w // (_QWEN_MERGE_SIZE**2)


def default_image_sizes(model: PreTrainedModel) -> list[tuple[int, int]]:
    """Sizes cycled through when a caller gives none: deliberately unequal for the families whose
    visual token count depends on the size, so default batches already mix counts."""
    kind = _kind(model)
    if kind == "llava":
        size = model.config.vision_config.image_size
        return [(size, size)]
    if kind == "llava_next":
        return [(28, 56), (56, 56), (40, 30), (60, 20)]
    return [(28, 28), (28, 56), (42, 28)]


def visual_token_mask(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.BoolTensor:
    """True where the model scatters visual features: LLaVA-NeXT's newline rows included (they carry
    the image token id), Qwen2-VL's vision start/end markers excluded (they are text tokens)."""
    ids = [model.config.image_token_id]
    video = getattr(model.config, "video_token_id", None)
    if video is not None:
        ids.append(video)
    return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def _split_text(total: int, parts: int, gen: torch.Generator) -> list[int]:
    """Split ``total`` text tokens into ``parts`` chunks around the images. The first and last chunks
    are never empty: real prompts start with a system/user prefix and end with text (the question,
    "ASSISTANT:"), and the last prompt position must be a text token because it predicts the first
    answer token and would otherwise be withdrawn."""
    if parts == 1:
        return [total]
    if total < 2:
        raise ValueError("a sample with images needs at least two text tokens (one before, one after)")
    cuts = sorted(torch.randint(0, total - 1, (parts - 1,), generator=gen).tolist())
    bounds = [0, *cuts, total - 2]
    chunks = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    chunks[0] += 1
    chunks[-1] += 1
    return chunks


def tiny_inputs(
    model: PreTrainedModel,
    batch_size: int = 2,
    *,
    padding_side: Literal["left", "right"] = "left",
    text_lengths: Sequence[int] | None = None,
    images_per_sample: Sequence[int] | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A padded batch that ``model(**inputs)`` and ``model.generate(**inputs)`` accept as is.

    ``text_lengths[b]`` counts sample b's random text tokens (Qwen's vision start/end markers come
    on top). ``images_per_sample[b]`` may be 0. ``image_sizes`` lists (height, width) per image in
    batch order (sample 0's images first); it changes token counts for LLaVA-NeXT and Qwen2-VL and
    must be the native size for LLaVA. Defaults give every sample a different length so that
    batches are padded.
    """
    kind = _kind(model)
    gen = torch.Generator().manual_seed(seed)
    if text_lengths is None:
        text_lengths = [6 + 3 * b for b in range(batch_size)]
    if images_per_sample is None:
        images_per_sample = [1] * batch_size
    if len(text_lengths) != batch_size or len(images_per_sample) != batch_size:
        raise ValueError("text_lengths and images_per_sample need one entry per sample")
    n_images = sum(images_per_sample)
    if image_sizes is None:
        defaults = default_image_sizes(model)
        image_sizes = [defaults[i % len(defaults)] for i in range(n_images)]
    image_sizes = [(int(h), int(w)) for h, w in image_sizes]
    if len(image_sizes) != n_images:
        raise ValueError(f"image_sizes has {len(image_sizes)} entries for {n_images} images")
    if kind == "llava":
        native = default_image_sizes(model)[0]
        if any(size != native for size in image_sizes):
            raise ValueError(f"LLaVA resizes every image to {native}; other image_sizes are meaningless")

    vocab = model.config.get_text_config().vocab_size
    image_token = model.config.image_token_id
    sequences: list[list[int]] = []
    image_iter = iter(image_sizes)
    for b in range(batch_size):
        chunks = _split_text(text_lengths[b], images_per_sample[b] + 1, gen)
        seq: list[int] = []
        for i, chunk in enumerate(chunks):
            seq += torch.randint(FIRST_TEXT_TOKEN_ID, vocab, (chunk,), generator=gen).tolist()
            if i == len(chunks) - 1:
                break
            count = num_image_tokens(model, next(image_iter))
            if kind == "qwen":
                seq += [
                    model.config.vision_start_token_id,
                    *[image_token] * count,
                    model.config.vision_end_token_id,
                ]
            else:
                seq += [image_token] * count
        sequences.append(seq)

    longest = max(len(s) for s in sequences)
    input_ids = torch.full((batch_size, longest), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
    for b, seq in enumerate(sequences):
        span = slice(longest - len(seq), longest) if padding_side == "left" else slice(0, len(seq))
        input_ids[b, span] = torch.tensor(seq, dtype=torch.long)
        attention_mask[b, span] = 1
    out: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}

    if kind == "qwen":
        out["mm_token_type_ids"] = (input_ids == image_token).to(torch.int32)
    if n_images == 0:
        return out

    if kind == "llava":
        size = default_image_sizes(model)[0][0]
        out["pixel_values"] = torch.randn(n_images, 3, size, size, generator=gen)
    elif kind == "llava_next":
        tile = model.config.vision_config.image_size
        crops = []
        for h, w in image_sizes:
            best_h, best_w = _best_resolution(h, w, model.config.image_grid_pinpoints)
            crops.append(1 + (best_h // tile) * (best_w // tile))
        pixel_values = torch.zeros(n_images, max(crops), 3, tile, tile)
        for i, n in enumerate(crops):
            pixel_values[i, :n] = torch.randn(n, 3, tile, tile, generator=gen)
        out["pixel_values"] = pixel_values
        out["image_sizes"] = torch.tensor(image_sizes, dtype=torch.long)
    else:
        grids = [_qwen_grid(size) for size in image_sizes]
        patch_dim = 3 * _QWEN_TEMPORAL_PATCH_SIZE * _QWEN_PATCH_SIZE**2
        n_patches = sum(math.prod(g) for g in grids)
        out["pixel_values"] = torch.randn(n_patches, patch_dim, generator=gen)
        out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    return out


def unbatch(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Split a padded batch from :func:`tiny_inputs` into unpadded batch-1 inputs, one per sample.

    Why: batched withdrawal must equal per-sample withdrawal, and the per-sample side of that check
    needs each sample's own slice of the image tensors, which are stored per image, not per sample.
    Images are assigned to samples in order by counting each sample's image tokens.
    """
    kind = _kind(model)
    image_token = model.config.image_token_id
    if kind == "llava":
        sizes: list[tuple[int, int]] = [default_image_sizes(model)[0]] * int(
            inputs.get("pixel_values", torch.empty(0)).shape[0]
        )
    elif kind == "llava_next":
        sizes = [tuple(s) for s in inputs["image_sizes"].tolist()] if "image_sizes" in inputs else []
    else:
        grids = inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else []
        sizes = [(h * _QWEN_PATCH_SIZE, w * _QWEN_PATCH_SIZE) for _, h, w in grids]
    counts = [num_image_tokens(model, size) for size in sizes]
    patch_counts = [int(g.prod()) for g in inputs["image_grid_thw"]] if kind == "qwen" and sizes else []

    samples = []
    first = 0
    for b in range(inputs["input_ids"].shape[0]):
        keep = inputs["attention_mask"][b].bool()
        ids = inputs["input_ids"][b, keep][None]
        sample: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if kind == "qwen":
            sample["mm_token_type_ids"] = inputs["mm_token_type_ids"][b, keep][None]
        need = int((ids == image_token).sum())
        last = first
        while need > 0:
            need -= counts[last]
            last += 1
        if need != 0:
            raise ValueError(f"sample {b}: image tokens do not add up to whole images")
        if last > first:
            if kind == "qwen":
                start = sum(patch_counts[:first])
                sample["pixel_values"] = inputs["pixel_values"][start : start + sum(patch_counts[first:last])]
                sample["image_grid_thw"] = inputs["image_grid_thw"][first:last]
            else:
                sample["pixel_values"] = inputs["pixel_values"][first:last]
                if kind == "llava_next":
                    sample["image_sizes"] = inputs["image_sizes"][first:last]
        samples.append(sample)
        first = last
    return samples
