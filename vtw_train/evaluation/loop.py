"""The one generate-and-score loop: greedy answers of a strategy, with each sample's exit and FLOPs.

Every comparison in the project (the main job's table, the harness, the toy model's exit sweep
and its held-out evaluation) runs through :func:`generate_answers`, so that "accuracy" and
"FLOPs" mean the same thing everywhere. The loop sees what only it can see: the batch after a
pre-LLM pruner rewrote it (kept token counts) and the exit layer each sample took, and costs
every sample from its own token counts under the strategy's reduction (docs/methods.md §11).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import adapters_enabled
from ..data.collate import VLMCollator, model_inputs
from ..data.records import VQARecord, load_image
from ..engine import FULL, ExitController, Reduction, attach
from ..flops import DecoderDims, flops_ratio, token_counts
from .strategies import Strategy

ImageTransform = Callable[[Any], Any]


@dataclass
class Answers:
    """Per-sample outputs of one run, in record order.

    ``exit_layers[i]`` is where sample i withdrew its visual tokens (None: never, or a strategy
    that does not exit); ``kept_visual[i]`` the visual tokens a pre-LLM pruner let in (None: no
    pruner); ``flops_ratios[i]`` its LM prefill FLOPs over the full model's on the same prompt.
    """

    predictions: list[str] = field(default_factory=list)
    flops_ratios: list[float] = field(default_factory=list)
    exit_layers: list[int | None] = field(default_factory=list)
    kept_visual: list[int | None] = field(default_factory=list)
    n_text: list[int] = field(default_factory=list)
    n_visual: list[int] = field(default_factory=list)

    @property
    def mean_text_tokens(self) -> float:
        """Mean non-visual prompt tokens: the text length every FLOPs ratio here is computed at."""
        return sum(self.n_text) / max(1, len(self.n_text))

    @property
    def mean_visual_in(self) -> float | None:
        """Mean visual tokens that entered the language model (after a pre-LLM pruner; None: no pruner)."""
        kept = [k for k in self.kept_visual if k is not None]
        return sum(kept) / len(kept) if kept else None


def _with_images(records: Sequence[VQARecord], transform: ImageTransform) -> list[VQARecord]:
    return [
        VQARecord(r.id, [transform(load_image(im)) for im in r.images], r.turns, r.question_type, r.source)
        for r in records
    ]


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    processor: Any,
    records: Sequence[VQARecord],
    reduction: Reduction = FULL,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    image_transform: ImageTransform | None = None,
    progress: Callable[[int], None] | None = None,
) -> Answers:
    """Greedy-decode every record under ``reduction`` (adapters as the model has them).

    Visual token ids are never emitted (docs/engine.md, trap 7). ``image_transform`` (PIL -> PIL,
    per image) supports controls such as a noise or blank image; ``progress(n)`` is called after
    each batch with its size.
    """
    controller = attach(model)
    collate = VLMCollator(processor, mode="generate")
    tok = getattr(processor, "tokenizer", processor)
    dims = DecoderDims.from_config(controller.language_model.config)
    device = next(model.parameters()).device
    model.eval()
    out = Answers()
    with controller.using(reduction):
        for start in range(0, len(records), batch_size):
            chunk = list(records[start : start + batch_size])
            if image_transform is not None:
                chunk = _with_images(chunk, image_transform)
            inputs = {k: v.to(device) for k, v in model_inputs(collate(chunk)).items()}
            visual = controller.visual_positions(inputs["input_ids"])
            n_text, n_visual = token_counts(visual, inputs.get("attention_mask"))
            inputs = reduction.prepare_inputs(model, inputs)
            kept = reduction.kept_visual_tokens()
            controller.last_exit_layers = None
            generated = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                suppress_tokens=list(controller.visual_token_ids),
            )
            texts = tok.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            exits = _exit_layers(controller, reduction, len(texts))
            for i, text in enumerate(texts):
                kept_i = None if kept is None else int(kept[i])
                plan = reduction.flops_plan(n_visual=n_visual[i], kept_visual=kept_i, exit_layer=exits[i])
                out.predictions.append(text)
                out.exit_layers.append(exits[i])
                out.kept_visual.append(kept_i)
                out.n_text.append(n_text[i])
                out.n_visual.append(n_visual[i])
                out.flops_ratios.append(flops_ratio(dims, n_text[i], n_visual[i], plan))
            if progress is not None:
                progress(len(texts))
    return out


def run_strategy(
    model: nn.Module,
    processor: Any,
    records: Sequence[VQARecord],
    strategy: Strategy,
    **kwargs: Any,
) -> Answers:
    """:func:`generate_answers` under a strategy: its reduction, with the adapters on or off as it says."""
    with adapters_enabled(model, strategy.adapters):
        return generate_answers(model, processor, records, strategy.reduction, **kwargs)


def _exit_layers(controller: ExitController, reduction: Reduction, batch: int) -> list[int | None]:
    """Where each sample withdrew. FastV also records its layer there, but keeps tokens, so it is not an exit."""
    if not reduction.withdraws:
        return [None] * batch
    recorded = controller.last_exit_layers
    if recorded is None:  # nothing withdrawn (e.g. K = L takes the stock path)
        return [None] * batch
    layers = [int(k) for k in recorded.tolist()]
    if len(layers) != batch:
        raise RuntimeError(f"the engine recorded {len(layers)} exit layers for a batch of {batch}")
    return [None if k >= controller.num_layers else k for k in layers]
