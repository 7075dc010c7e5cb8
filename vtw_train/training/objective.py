"""The training objective: LoRA learns to make early exits good, the gate learns where they are.

Teacher and student are the same weights (docs/methods.md §4, §14.5): the teacher runs with the
LoRA adapters disabled, all visual tokens kept, no gradients; the student (adapters on) is run
at every candidate exit from one shared-prefix pass, so each step measures how far every exit
is from the teacher. Three losses, each weighted by a config key:

- ``kd``: forward KL(teacher || student at K) on answer tokens (temperature-scaled), averaged
  over the exits the schedule picks;
- ``gate``: binary cross-entropy of the gate's p_exit at layer l against "exit at K = l + 1 is
  safe" (per-sample answer KL <= ``kl_threshold``), made monotone (safe at l only if safe at
  every later layer);
- ``cost``: the expected language-model FLOPs ratio under the gate's exit distribution, which
  pushes exits earlier; the gate loss holds them back where they hurt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import adapters_enabled
from ..calibration import kl_divergence, log_probs, masked_mean, states_at, target_positions
from ..engine import attach
from ..engine.sweep import run_sweep
from ..flops import exit_flops_ratios
from ..gate import ExitGate, gate_features, pooling_weights, text_feature_masks


@dataclass
class DistillConfig:
    """Loss settings.

    kd_exits: which exits get the distillation loss: ``all`` candidates (plus the full
        model), or one ``random`` candidate per sample (plus the full model).
    label_rule: when exiting at K counts as safe for a sample, the gate's training label:
        ``kl``: its mean answer KL(teacher || student at K) is at most ``kl_threshold``;
        ``dyvte``: DyVTE's rule, the student at K agrees with the teacher's argmax on more than
        ``agree_threshold`` of the answer tokens and its answer cross-entropy is below
        ``ce_ratio`` times the teacher's (docs/methods.md §3.2). Either is made monotone.
    temperature: softens both distributions in the KD loss (scaled back by T^2).
    """

    kd_weight: float = 1.0
    gate_weight: float = 1.0
    cost_weight: float = 0.05
    temperature: float = 1.0
    kl_threshold: float = 0.05
    kd_exits: str = "all"
    label_rule: str = "kl"
    agree_threshold: float = 0.99
    ce_ratio: float = 1.03

    def __post_init__(self) -> None:
        if self.kd_exits not in ("all", "random"):
            raise ValueError(f"distill kd_exits must be 'all' or 'random', got {self.kd_exits!r}.")
        if self.label_rule not in ("kl", "dyvte"):
            raise ValueError(f"distill label_rule must be 'kl' or 'dyvte', got {self.label_rule!r}.")
        if not 0 <= self.agree_threshold <= 1 or self.ce_ratio <= 0:
            raise ValueError(
                f"distill agree_threshold must be in [0, 1] and ce_ratio > 0, got {self.agree_threshold}, {self.ce_ratio}."
            )
        if self.temperature <= 0:
            raise ValueError(f"distill temperature must be > 0, got {self.temperature}.")
        for name in ("kd_weight", "gate_weight", "cost_weight", "kl_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"distill {name} must be >= 0, got {getattr(self, name)}.")


@dataclass
class StepOutput:
    loss: torch.Tensor
    kd_loss: torch.Tensor
    gate_loss: torch.Tensor
    cost_loss: torch.Tensor
    exit_layers: list[int]  # the K of each column below
    kl: torch.Tensor  # [B, len(exit_layers)] per-sample answer KL(teacher || student at K), detached
    agree: torch.Tensor  # [B, len(exit_layers)] bool: argmax matches the teacher on every answer token
    gate_prob: torch.Tensor  # [B, len(candidate gate layers)] detached
    gate_label: torch.Tensor  # [B, len(candidate gate layers)] float
    gate_exit: torch.Tensor  # [B] K the gate picks at tau (num_layers when it never fires)
    flops_ratio: torch.Tensor  # [B] FLOPs ratio of gate_exit
    teacher_tokens: torch.Tensor  # [B, P] teacher argmax at answer positions
    valid: torch.Tensor  # [B, P]


def teacher_log_probs(
    model: nn.Module, batch: dict[str, torch.Tensor], positions: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Adapters off, all visual tokens, eval mode, no gradients: the frozen base model."""
    controller = attach(model)
    was_training = model.training
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    try:
        with torch.no_grad(), controller.using(), adapters_enabled(model, False):
            hidden = controller.wrapper(**inputs, use_cache=False)[0]
            return log_probs(model.get_output_embeddings(), states_at(hidden, positions), temperature)
    finally:
        model.train(was_training)


def _at_temperature_1(log_p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities at temperature 1 from those at ``temperature`` (the same logits, rescaled)."""
    return log_p if temperature == 1.0 else F.log_softmax(log_p * temperature, dim=-1)


def monotone_safe_labels(safe: torch.Tensor) -> torch.Tensor:
    """``safe[b, l]`` -> 1 only if exiting at l and at every later layer is safe (suffix AND)."""
    flipped = torch.flip(safe.float(), dims=[1])
    return torch.flip(torch.cummin(flipped, dim=1).values, dims=[1])


def dyvte_safe(
    teacher: torch.Tensor,
    student: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    agree_threshold: float = 0.99,
    ce_ratio: float = 1.03,
) -> torch.Tensor:
    """DyVTE's label, per sample ``[B]``: exiting is safe when the exited model agrees with the full
    one's argmax on more than ``agree_threshold`` of the answer tokens and its answer cross-entropy is
    below ``ce_ratio`` times the full model's.

    ``teacher`` / ``student``: log-probabilities ``[B, P, V]`` at the answer positions; ``targets``:
    the answer tokens they predict ``[B, P]``; ``valid``: ``[B, P]``.
    """
    agree = masked_mean(((student.argmax(-1) == teacher.argmax(-1)) & valid).float(), valid)
    pick = targets.clamp_min(0).unsqueeze(-1)
    ce_student = masked_mean(-student.gather(-1, pick).squeeze(-1), valid)
    ce_teacher = masked_mean(-teacher.gather(-1, pick).squeeze(-1), valid)
    return (agree > agree_threshold) & (ce_student < ce_ratio * ce_teacher)


def exit_distribution(p: torch.Tensor) -> torch.Tensor:
    """P(first fire at layer column j) and, last column, P(never fires): ``[B, n + 1]``."""
    survive = torch.cumprod(torch.cat([torch.ones_like(p[:, :1]), 1 - p], dim=1), dim=1)
    return torch.cat([p * survive[:, :-1], survive[:, -1:]], dim=1)


def distill_step(
    model: nn.Module,
    gate: ExitGate,
    batch: dict[str, torch.Tensor],
    config: DistillConfig,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One training (or validation) step's losses and diagnostics."""
    controller = attach(model)
    num_layers = controller.num_layers
    gate_layers = gate.config.candidate_layers
    exit_layers = [gate.config.exit_layer_of(layer) for layer in gate_layers] + [num_layers]
    positions, valid = target_positions(batch, "answer_mean")
    prompt_end = positions[:, 0] + 1  # the first answer token is predicted from the last prompt token
    teacher = teacher_log_probs(model, batch, positions, config.temperature)

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with controller.using():
        sweep = run_sweep(model, inputs, exit_layers[:-1], positions, keep_layer_outputs=True)
    head = model.get_output_embeddings()
    kl_columns, agree_columns, dyvte_columns = [], [], []
    teacher_tokens = teacher.argmax(-1)
    dyvte = config.label_rule == "dyvte"
    if dyvte:  # DyVTE's cross-entropies are on the answer tokens, at temperature 1
        targets = batch["labels"].gather(1, (positions + 1).clamp_max(batch["labels"].shape[1] - 1))
        teacher_1 = _at_temperature_1(teacher, config.temperature)
    for k in exit_layers:
        student = log_probs(head, sweep.states[k], config.temperature)
        kl = kl_divergence(teacher, student)  # [B, P]
        kl_columns.append(masked_mean(kl, valid) * config.temperature**2)
        agree_columns.append(((student.argmax(-1) == teacher_tokens) | ~valid).all(1))
        if dyvte and k < num_layers:
            student_1 = _at_temperature_1(student.detach(), config.temperature)
            dyvte_columns.append(
                dyvte_safe(teacher_1, student_1, targets, valid, config.agree_threshold, config.ce_ratio)
            )
    kl_matrix = torch.stack(kl_columns, dim=1)  # [B, nK]
    if config.kd_exits == "all":
        pick = torch.ones_like(kl_matrix)
    else:
        choice = torch.randint(0, len(exit_layers) - 1, (kl_matrix.shape[0],), generator=generator)
        pick = F.one_hot(choice.to(kl_matrix.device), len(exit_layers)).float()
        pick[:, -1] = 1.0
    kd_loss = (kl_matrix * pick).sum() / pick.sum()

    padding = batch.get("attention_mask")
    pooling = pooling_weights(*text_feature_masks(sweep.visual, padding, prompt_end))
    logits = torch.stack(
        [gate(gate_features(sweep.layer_outputs[layer], pooling=pooling), layer) for layer in gate_layers],
        dim=1,
    )
    prob = torch.sigmoid(logits)
    if dyvte:
        safe = torch.stack(dyvte_columns, dim=1)
    else:
        safe = kl_matrix[:, :-1].detach() <= config.kl_threshold
    labels = monotone_safe_labels(safe)
    gate_loss = F.binary_cross_entropy_with_logits(logits, labels)
    ratios = exit_flops_ratios(controller.language_model.config, sweep.visual, padding, exit_layers)
    cost_loss = (exit_distribution(prob) * ratios).sum(1).mean()
    loss = config.kd_weight * kd_loss + config.gate_weight * gate_loss + config.cost_weight * cost_loss

    fires = prob.detach() >= gate.config.tau
    first = torch.where(
        fires.any(1),
        fires.float().argmax(1),
        torch.full_like(fires[:, 0], len(gate_layers), dtype=torch.long),
    )
    gate_exit = torch.tensor(exit_layers, device=first.device)[first]
    return StepOutput(
        loss=loss,
        kd_loss=kd_loss.detach(),
        gate_loss=gate_loss.detach(),
        cost_loss=cost_loss.detach(),
        exit_layers=exit_layers,
        kl=kl_matrix.detach(),
        agree=torch.stack(agree_columns, 1),
        gate_prob=prob.detach(),
        gate_label=labels,
        gate_exit=gate_exit,
        flops_ratio=ratios.gather(1, first.unsqueeze(1)).squeeze(1),
        teacher_tokens=teacher_tokens,
        valid=valid,
    )
