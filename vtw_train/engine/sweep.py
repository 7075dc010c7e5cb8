"""Every candidate exit layer for a batch, from one full pass.

Calibration needs the model's output at every K. Rerunning the decoder per K (what VTW's
reference code does) costs L forwards. Here the full stream runs once while the input of
every layer is kept; the text-only tail for K then starts from layer K's input. Tails that
have started are stacked along the batch and advance together, so the extra cost is the
text-only layers only (cheap, since visual tokens dominate the prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.masking_utils import create_causal_mask

from .controller import attach
from .layout import build_text_layout


@dataclass
class SweepResult:
    """Final-normed states at the target positions per exit K, plus what the gate reads.

    ``states[K]``: ``[B, P, D]`` for each candidate K and for ``num_layers`` (the full model).
    ``layer_outputs[l]``: ``[B, T, D]`` full-stream output of layer l (input of layer l + 1),
    kept only when asked for; the learned gate reads its features from these.
    """

    states: dict[int, torch.Tensor]
    layer_outputs: list[torch.Tensor] = field(default_factory=list)
    visual: torch.Tensor | None = None


@torch.no_grad()
def exit_sweep(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    candidates: Sequence[int],
    target_positions: torch.Tensor,
) -> dict[int, torch.Tensor]:
    """Final-normed hidden states at ``target_positions`` for the full model and each exit K.

    ``target_positions``: ``[B, P]`` full-stream positions (non-visual, real tokens) whose
    states are wanted, e.g. the last prompt token. Returns ``{K: [B, P, D]}`` for every K in
    ``candidates`` plus ``num_layers`` (the full model).
    """
    return run_sweep(model, inputs, candidates, target_positions).states


def run_sweep(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    candidates: Sequence[int],
    target_positions: torch.Tensor,
    keep_layer_outputs: bool = False,
) -> SweepResult:
    """:func:`exit_sweep` with autograd left as the caller has it (training uses this)."""
    controller = attach(model)
    lm = controller.language_model
    num_layers = controller.num_layers
    layer_inputs: list[torch.Tensor] = []
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(module, args, kwargs):
        layer_inputs.append(args[0] if args else kwargs["hidden_states"])
        if "pe" not in rope:
            rope["pe"] = kwargs["position_embeddings"]

    last_output: dict[str, torch.Tensor] = {}

    def capture_last(module, args, kwargs, output):
        last_output["h"] = output[0] if isinstance(output, tuple) else output

    hooks = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in lm.layers]
    hooks.append(lm.layers[-1].register_forward_hook(capture_last, with_kwargs=True))
    try:
        with controller.using():
            visual = controller.visual_positions(inputs.get("input_ids"))
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            full_hidden = controller.wrapper(**inputs, use_cache=False)[0]
    finally:
        for hook in hooks:
            hook.remove()

    batch = full_hidden.shape[0]
    results = {num_layers: _at(full_hidden, target_positions)}
    padding = inputs.get("attention_mask")
    layout = build_text_layout(visual, padding)
    # where each target sits in the text layout
    slot_of = torch.full((batch, layout.full_length), -1, dtype=torch.long, device=visual.device)
    slots = torch.arange(layout.length, device=visual.device).expand(batch, -1)
    slot_of.scatter_(1, torch.where(layout.valid, layout.index, layout.full_length - 1), slots)
    target_slots = torch.gather(slot_of, 1, target_positions)
    if bool((target_slots < 0).any()):
        raise ValueError("exit_sweep target positions must be real, non-visual tokens.")

    cos, sin = (t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t for t in rope["pe"])
    text_cos, text_sin = layout.gather(cos), layout.gather(sin)
    wanted = sorted({k for k in candidates if k < num_layers})
    tails: torch.Tensor | None = None
    started: list[int] = []
    for layer_idx in range(num_layers):
        if layer_idx in wanted:
            fresh = layout.gather(layer_inputs[layer_idx])
            tails = fresh if tails is None else torch.cat([tails, fresh])
            started.append(layer_idx)
        if tails is None:
            continue
        copies = len(started)
        valid = layout.valid.long().repeat(copies, 1)
        mask = create_causal_mask(
            config=lm.config,
            inputs_embeds=tails.new_empty((tails.shape[0], tails.shape[1], 0)),
            attention_mask=valid,
            past_key_values=None,
            position_ids=None,
        )
        tails = lm.layers[layer_idx](
            tails,
            attention_mask=mask,
            position_embeddings=(text_cos.repeat(copies, 1, 1), text_sin.repeat(copies, 1, 1)),
            position_ids=None,
            past_key_values=None,
            use_cache=False,
        )
    if tails is not None:
        normed = lm.norm(tails)
        for i, k in enumerate(started):
            results[k] = _at(normed[i * batch : (i + 1) * batch], target_slots)
    outputs = (layer_inputs[1:] + [last_output["h"]]) if keep_layer_outputs else []
    return SweepResult(states=results, layer_outputs=outputs, visual=visual)


def _at(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
