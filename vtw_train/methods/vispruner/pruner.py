"""VisPruner end to end: prune a batch's visual tokens and rewrite its inputs for the model.

How it plugs into stock transformers 5.x without forking modeling code: the image features are
computed once (``encoding``), pruned per image, and handed back as
``mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[...])}``, which both
``model(**inputs)`` and ``model.generate(**inputs)`` accept (``generate()`` itself encodes images
into that argument before prefill, docs/engine.md trap 1, and skips encoding when it is already
there). The prompt is rewritten to match (``prompt``).

Positions. LLaVA / LLaVA-NeXT: none are passed, so the model derives compacted positions from the
shortened prompt: the LLM simply receives fewer tokens, as in the reference. Qwen2-VL: the model's
own ``get_rope_index`` runs on the unpruned prompt and the M-RoPE ``(t, h, w)`` ids of the
surviving tokens are passed as ``position_ids [3, B, n']``; kept visual tokens keep their grid
positions (docs/methods.md §5.1).

Not supported (clear errors): Qwen2.5-VL (window permutation), videos, ``vision_feature_layer``
lists, ``vision_feature_select_strategy="full"``, CLIP-less LLaVA towers (SigLIP), precomputed
``inputs_embeds`` / ``position_ids`` / ``mm_encoder_outputs``.

Reuse note: ``generate(num_return_sequences>1)`` / beam search expand ``mm_encoder_outputs`` in
place (stock transformers). Build fresh inputs for each such call instead of reusing one dict.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ...adapters import base_model_of
from ...flops import ExitPlan
from .encoding import ENCODERS, model_type_of
from .prompt import (
    CONSUMED_KEYS,
    PER_TOKEN_KEYS,
    REJECTED_KEYS,
    assign_images,
    pad_token_id,
    padding_side,
    repack,
    repack_positions,
)
from .selection import (
    DIVERSITY_STEP,
    RandomSelection,
    TokenSelection,
    budgets,
    check_num_tokens,
    check_ratio,
    select_visual_tokens,
)

#: LLaVA-NeXT crops: ``reference`` picks T among all of a crop's tokens, then unpadding drops some (at
#: most T kept, VisPruner's own behaviour); ``surviving`` picks T among the tokens unpadding keeps.
NextBudget = Literal["reference", "surviving"]


def image_token_of(config: Any) -> int:
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if token is None:
        raise ValueError(f"{type(config).__name__} has no image_token_id")
    return int(token)


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


def prune_visual_tokens(
    model: Any,
    inputs: Mapping[str, Any],
    num_tokens: int,
    important_ratio: float = 0.5,
    *,
    budget: NextBudget = "reference",
    return_info: bool = False,
    select: Any = None,
) -> dict[str, Any] | tuple[dict[str, Any], PruneInfo]:
    """Model inputs in which every image keeps at most ``num_tokens`` visual tokens (VisPruner).

    ``inputs`` are ordinary processor / ``tiny_inputs`` outputs (``input_ids``, ``attention_mask``,
    ``pixel_values`` and the family's extras). The result is accepted unchanged by ``model(**out)``
    and ``model.generate(**out)``, on a batch with left (or right, for forward) padding and any number
    of images per sample: the pruned features travel as ``mm_encoder_outputs`` and each image's
    placeholder run is shortened to its kept count. Keys that are not model tensors (e.g. a
    collator's ``answers``) pass through unchanged. With ``return_info=True`` a :class:`PruneInfo`
    comes along. Grad mode is the caller's: under autograd the kept features stay differentiable.
    ``select`` replaces VisPruner's choice per image (default :func:`select_visual_tokens`; e.g. a
    :class:`RandomSelection` control).
    """
    num_tokens = check_num_tokens(num_tokens)
    important_ratio = check_ratio(important_ratio)
    model = base_model_of(model)
    model_type = model_type_of(model)
    for key, why in REJECTED_KEYS.items():
        if inputs.get(key) is not None:
            raise ValueError(f"prune_visual_tokens does not accept {key!r}: {why}")
    input_ids = inputs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("prune_visual_tokens needs input_ids [batch, seq] (a tensor)")
    mask = inputs.get("attention_mask")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    side = padding_side(valid)
    image_token = image_token_of(model.config)
    is_image = input_ids == image_token
    notes: list[str] = []

    batch = input_ids.shape[0]
    out = {k: v for k, v in inputs.items() if k not in CONSUMED_KEYS}
    before = (is_image & valid).sum(dim=1).tolist()
    if inputs.get("pixel_values") is None:
        if bool((is_image & valid).any()):
            raise ValueError("input_ids contain image tokens but no pixel_values were given")
        info = PruneInfo(model_type, num_tokens, important_ratio, side, [], before, before, notes)
        return (out, info) if return_info else out

    if budget not in ("reference", "surviving"):
        raise ValueError(f"budget must be 'reference' or 'surviving', got {budget!r}")
    enc = ENCODERS[model_type](
        model, inputs, num_tokens, important_ratio, notes, budget, select=select or select_visual_tokens
    )
    owners, slots = assign_images(is_image, valid, enc.original)

    keep = valid & ~is_image
    images = []
    for k, (owner, run) in enumerate(zip(owners, slots, strict=True)):
        kept_slots = run[enc.kept_index[k].to(run.device)]
        keep[owner, kept_slots] = True
        images.append(
            ImagePruning(owner, enc.original[k], enc.kept_index[k], enc.selections[k], enc.importance[k])
        )

    pad_id = pad_token_id(model, input_ids, valid)
    for key, pad in PER_TOKEN_KEYS.items():
        value = inputs.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or tuple(value.shape[:2]) != tuple(input_ids.shape):
            raise ValueError(f"{key!r} must be a tensor shaped like input_ids {tuple(input_ids.shape)}")
        out[key] = repack(value, keep, pad_id if pad is None else pad, side)
    if mask is None:
        out["attention_mask"] = repack(valid.long(), keep, 0, side)

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
        out["position_ids"] = repack_positions(full_positions, keep, side)
        if "mm_token_type_ids" not in out:
            out["mm_token_type_ids"] = repack(types, keep, 0, side)

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


class VisPruner:
    """VisPruner as a strategy: ``prepare(model, inputs)`` rewrites a batch before the model sees it.

    ``num_tokens`` (T) is the number of visual tokens kept per image (per crop on LLaVA-NeXT, where
    image-newline tokens come on top); ``important_ratio`` (r) the share of T chosen by [CLS]
    importance, the rest by diversity. The paper's settings are T in {128, 64, 32} with r = 0.5.
    ``last_info`` holds the :class:`PruneInfo` of the latest ``prepare`` call. ``ranking="random"``
    keeps T tokens drawn at random instead (seeded by ``seed``): the control that shows what the
    [CLS] ranking is worth.
    """

    name = "vispruner"

    def __init__(
        self,
        num_tokens: int,
        important_ratio: float = 0.5,
        budget: NextBudget = "reference",
        ranking: Literal["cls", "random"] = "cls",
        seed: int = 0,
    ) -> None:
        self.num_tokens = check_num_tokens(num_tokens)
        self.important_ratio = check_ratio(important_ratio)
        if budget not in ("reference", "surviving"):
            raise ValueError(f"VisPruner budget must be 'reference' or 'surviving', got {budget!r}")
        if ranking not in ("cls", "random"):
            raise ValueError(f"VisPruner ranking must be 'cls' or 'random', got {ranking!r}")
        self.budget = budget
        self.ranking = ranking
        self._select = select_visual_tokens if ranking == "cls" else RandomSelection(seed)
        self.last_info: PruneInfo | None = None

    @property
    def important_tokens(self) -> int:
        return budgets(self.num_tokens, self.important_ratio)[0]

    @property
    def diverse_tokens(self) -> int:
        return budgets(self.num_tokens, self.important_ratio)[1]

    def prepare(self, model: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
        new_inputs, info = prune_visual_tokens(
            model,
            inputs,
            self.num_tokens,
            self.important_ratio,
            budget=self.budget,
            return_info=True,
            select=self._select,
        )
        self.last_info = info
        return new_inputs

    def kept_visual_tokens(self) -> list[int]:
        """Visual tokens per sample that the last :meth:`prepare` let into the language model."""
        if self.last_info is None:
            raise RuntimeError("VisPruner.kept_visual_tokens() was called before prepare().")
        return list(self.last_info.visual_tokens_after)

    def flops_plan(
        self, n_visual: int | None = None, *, num_images: int = 1, exit_layer: int | None = None
    ) -> ExitPlan:
        """Prefill FLOPs plan (``vtw_train.flops``) for a prompt with ``num_images`` images holding
        ``n_visual`` visual tokens in all: ``min(n_visual, T * num_images)`` enter the LLM, and
        ``exit_layer`` adds VTW on top (docs/methods.md §11). Exact for LLaVA-1.5 (equal-sized images);
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
            "budget": self.budget,
            "ranking": self.ranking,
            "scope": "per image; per crop on LLaVA-NeXT (newline tokens kept); after the merger on Qwen2-VL",
            "positions": "compacted (LLaVA, LLaVA-NeXT); original M-RoPE ids of kept tokens (Qwen2-VL)",
        }

    def __repr__(self) -> str:
        return (
            f"VisPruner(num_tokens={self.num_tokens}, important_ratio={self.important_ratio}, budget={self.budget!r}, "
            f"ranking={self.ranking!r})"
        )
