"""Greedy answers of one strategy on the evaluated records, with each sample's FLOPs ratio.

Why not ``vtw_train.data.evaluate_exact_match``: VisPruner must rewrite every batch's inputs
between collation and ``generate``, and the FLOPs of a sample depend on what the engine and
the pruner did to that very batch (per-sample exit layers, kept token counts), which only
this loop sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data.collate import VLMCollator, model_inputs
from ..data.records import VQARecord
from ..engine import ExitController
from ..flops import DecoderDims
from .accounting import sample_ratios, token_counts
from .configure import pruner_of
from .strategies import Strategy


@dataclass
class Generated:
    """Per-sample outputs of one strategy, in record order."""

    predictions: list[str]
    flops_ratios: list[float]
    exit_layers: list[int | None]


def to_device(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    processor,
    controller: ExitController,
    strategy: Strategy,
    records: Sequence[VQARecord],
    *,
    frozen: frozenset[int],
    batch_size: int,
    max_new_tokens: int,
) -> Generated:
    """Greedy-decode every record under the strategy the controller is already configured for.

    Visual token ids are suppressed in decoding for every strategy alike (ENGINE_NOTES trap 7).
    """
    collate = VLMCollator(processor, mode="generate")
    tok = getattr(processor, "tokenizer", processor)
    dims = DecoderDims.from_config(controller.language_model.config)
    device = next(model.parameters()).device
    pruner = pruner_of(strategy)
    out = Generated([], [], [])
    for start in range(0, len(records), batch_size):
        inputs = to_device(model_inputs(collate(list(records[start : start + batch_size]))), device)
        n_text, n_visual = token_counts(
            inputs["input_ids"], inputs.get("attention_mask"), controller.visual_token_ids
        )
        kept = None
        if pruner is not None:
            inputs = pruner.prepare(model, inputs)
            assert pruner.last_info is not None
            kept = pruner.last_info.visual_tokens_after
        controller.last_exit_layers = None
        generated = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            suppress_tokens=list(controller.visual_token_ids),
        )
        texts = tok.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        exits = _exit_layers(controller, strategy, len(texts))
        out.predictions.extend(texts)
        out.exit_layers.extend(exits)
        out.flops_ratios.extend(sample_ratios(dims, strategy, n_text, n_visual, kept, exits, frozen))
    return out


def _exit_layers(controller: ExitController, strategy: Strategy, batch: int) -> list[int | None]:
    """Where each sample withdrew. FastV also records its layer there, but keeps tokens, so it is not an exit."""
    if not strategy.withdraws:
        return [None] * batch
    recorded = controller.last_exit_layers
    if recorded is None:  # nothing withdrawn (e.g. K = L takes the stock path)
        return [None] * batch
    layers = [int(k) for k in recorded.tolist()]
    if len(layers) != batch:
        raise RuntimeError(f"the engine recorded {len(layers)} exit layers for a batch of {batch}")
    return [None if k >= controller.num_layers else k for k in layers]
