"""Build the toy VLM: a stock ``LlavaForConditionalGeneration`` plus its processor.

Why stock classes only: the saved directory must load with
``AutoModelForImageTextToText`` / ``AutoProcessor`` and no project code, so that every
code path exercised on the toy is the one later used on LLaVA-1.5 checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vtw_train.data.synthetic import BACKGROUND, IMAGE_SIZE, PATCH
from vtw_train.toy.tokenizer import CHAT_TEMPLATE, CHAT_TEMPLATE_QUESTION_FIRST, build_tokenizer


@dataclass
class ToyArchConfig:
    """Architecture of the toy VLM (the committed model's values are in ``configs/toy/toy_vlm.yaml``)."""

    image_size: int = IMAGE_SIZE
    """Image side in pixels."""
    patch_size: int = PATCH
    """Vision patch side in pixels ((image_size / patch_size)^2 visual tokens)."""
    vision_hidden: int = 128
    """Width of the CLIP vision tower."""
    vision_layers: int = 4
    """Depth of the vision tower."""
    vision_heads: int = 4
    """Attention heads of the vision tower."""
    vision_intermediate: int = 512
    """MLP width of the vision tower."""
    text_hidden: int = 128
    """Width of the Llama decoder."""
    text_layers: int = 8
    """Depth of the decoder."""
    text_heads: int = 4
    """Attention heads of the decoder."""
    text_intermediate: int = 512
    """MLP width of the decoder."""
    max_position_embeddings: int = 256
    """Longest sequence the decoder's rotary table covers."""
    vision_feature_layer: int = -1
    """Tower layer the projector reads."""
    position_init_scale: float = 1.0
    """Scale of the patch position embeddings' 2-D sinusoidal initialisation (0 keeps the default)."""
    projector_init_ratio: float = 1.0
    """Target std of projected visual tokens relative to word embeddings at initialisation."""
    patch_init_std: float = 0.072
    """Std of the patch-embedding init (0 keeps CLIP's 0.02, which makes object content a ~10% ripple
    on the background and position in the tower's input)."""
    background_mean: bool = True
    """Normalise images around the synthetic background colour, so empty patches embed to ~0."""
    prompt_order: str = "image_first"
    """Chat template order: "image_first" (LLaVA-1.5 eval style) or "question_first" (also in
    LLaVA-1.5's training data). With the question first, each visual token can already tell whether
    it is the object asked about; later turns of a conversation still come after the image."""


def build_processor(arch: ToyArchConfig | None = None) -> LlavaProcessor:
    """Word-level tokenizer + PIL CLIP image processor (no torchvision needed)."""
    arch = arch or ToyArchConfig()
    extra = {"image_mean": [c / 255 for c in BACKGROUND]} if arch.background_mean else {}
    image_processor = CLIPImageProcessorPil(
        **extra,
        size={"shortest_edge": arch.image_size},
        crop_size={"height": arch.image_size, "width": arch.image_size},
    )
    if arch.prompt_order not in ("image_first", "question_first"):
        raise ValueError(f"prompt_order must be 'image_first' or 'question_first', got {arch.prompt_order!r}")
    template = CHAT_TEMPLATE if arch.prompt_order == "image_first" else CHAT_TEMPLATE_QUESTION_FIRST
    tokenizer = build_tokenizer()
    tokenizer.chat_template = template
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=arch.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=template,
    )


def build_config(arch: ToyArchConfig, tokenizer) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden,
        intermediate_size=arch.vision_intermediate,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        projection_dim=arch.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_heads,
        max_position_embeddings=arch.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=arch.vision_feature_layer,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )


def _sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) code: half the channels encode the row, half the column, at
    frequencies from one period over ~2 grids down to 2 cells, so position is linearly readable."""
    quarter = dim // 4
    periods = torch.logspace(math.log10(2 * grid), math.log10(2.0), quarter)
    pos = torch.arange(grid, dtype=torch.float32)
    ang = 2 * math.pi * pos[:, None] / periods[None, :]
    code1d = torch.cat([ang.sin(), ang.cos()], dim=1)  # (grid, 2*quarter)
    rows = code1d[:, None, :].expand(grid, grid, -1)
    cols = code1d[None, :, :].expand(grid, grid, -1)
    out = torch.cat([rows, cols], dim=-1).reshape(grid * grid, -1)
    return torch.nn.functional.pad(out, (0, dim - out.shape[1]))


@torch.no_grad()
def _init_for_vision_use(model: LlavaForConditionalGeneration, arch: ToyArchConfig) -> None:
    """Initialisation choices (architecture unchanged) that make the image usable early.

    CLIP's default position embeddings (std 0.02) are ~50x weaker than patch content, so
    the tower starts nearly position-blind; a 2-D sinusoidal code makes "where" readable.
    CLIP's patch-embedding init (std 0.02) likewise leaves object content weak; a larger std
    and background-centred normalisation make objects stand out from empty patches.
    The projector's default output is ~0.4x the spread of word embeddings; it is rescaled
    so visual tokens are not drowned out in the decoder's residual stream.
    """
    vt = model.model.vision_tower.embeddings
    if arch.patch_init_std > 0:
        vt.patch_embedding.weight.normal_(0.0, arch.patch_init_std)
    if arch.position_init_scale > 0:
        grid = arch.image_size // arch.patch_size
        pe = vt.position_embedding.weight
        pe[1:] = arch.position_init_scale * _sincos_2d(grid, pe.shape[1])
    if arch.projector_init_ratio > 0:
        proj = model.model.multi_modal_projector
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, proj.linear_1.in_features, generator=g)
        ratio = proj(x).std() / model.get_input_embeddings().weight.std()
        proj.linear_2.weight.mul_(arch.projector_init_ratio / ratio)


def build_model(
    arch: ToyArchConfig | None = None, tokenizer=None, seed: int = 0
) -> LlavaForConditionalGeneration:
    """A freshly initialised toy VLM (deterministic for ``seed``)."""
    arch = arch or ToyArchConfig()
    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(arch, tokenizer))
    _init_for_vision_use(model, arch)
    return model


def miniature_arch() -> ToyArchConfig:
    """A tiny architecture for fast tests (same code paths, seconds to build)."""
    return ToyArchConfig(
        vision_hidden=32,
        vision_layers=1,
        vision_heads=2,
        vision_intermediate=64,
        text_hidden=32,
        text_layers=2,
        text_heads=2,
        text_intermediate=64,
    )
