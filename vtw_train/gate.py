"""The learned exit gate (DyVTE-style, one small module shared by all layers).

At a candidate layer l the gate reads what the text tokens know at that point (the mean of
the prompt's text after the image, and the last prompt token) and answers the probability
that withdrawing the visual tokens after layer l is safe for this input. DyVTE trains one
router per layer (about 17M parameters each at 7B, 0.54B in all); one router shared across
layers, told where it is by a layer embedding, sees every layer's examples at every step and
costs about a million parameters for a 7B model at width 128 (docs/methods.md §3.5).

Features are detached: the gate reads the representation, it does not shape it (the
distillation loss on the LoRA adapters does that).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .engine import Reduction, attach

Policy = Literal["gate", "fixed", "gate_capped"]
#: Every exit policy, in the order errors list them.
POLICIES: tuple[str, ...] = ("gate", "fixed", "gate_capped")


@dataclass
class GateConfig:
    """Architecture and decision rule of the gate.

    width: hidden width of the router MLP (docs/methods.md §3.5: <= 256).
    tau: exit when p_exit >= tau. DyVTE's rule is tau = 0.5, min_layer = 0, lag = 0.
    min_layer: first layer after which the gate is asked.
    lag: a decision made after layer l withdraws the visual tokens from layer l + 1 + lag on.
        With lag >= 1 the engine reads the decision while the next layers already run, so asking
        the gate never stalls the GPU; training labels each decision at the exit it will cause.
    ask_every: ask after every ``ask_every``-th candidate layer only (fewer, cheaper decisions).
    """

    hidden_size: int
    num_layers: int
    width: int = 128
    tau: float = 0.5
    min_layer: int = 1
    lag: int = 0
    ask_every: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"gate tau must be in (0, 1], got {self.tau}.")
        if not 0 <= self.min_layer < self.num_layers:
            raise ValueError(f"gate min_layer must be in [0, {self.num_layers - 1}], got {self.min_layer}.")
        if self.width < 1:
            raise ValueError(f"gate width must be >= 1, got {self.width}.")
        if self.lag < 0 or self.ask_every < 1:
            raise ValueError(
                f"gate lag must be >= 0 and ask_every >= 1, got {self.lag} and {self.ask_every}."
            )
        if not self.candidate_layers:
            raise ValueError(
                f"gate min_layer={self.min_layer} with lag={self.lag} leaves no layer to ask on a "
                f"{self.num_layers}-layer decoder (the exit must come before the last layer)."
            )

    @property
    def candidate_layers(self) -> list[int]:
        """Layers after which the gate is asked (exiting after the last layer saves nothing)."""
        return list(range(self.min_layer, self.num_layers - 1 - self.lag, self.ask_every))

    def exit_layer_of(self, layer: int) -> int:
        """The exit layer K that a decision made after ``layer`` causes."""
        return layer + 1 + self.lag

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GateConfig:
        data = json.loads(Path(path).read_text())
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown gate config keys {sorted(unknown)}.")
        return cls(**data)


class ExitGate(nn.Module):
    """``p_exit`` for (text features after layer l, l)."""

    def __init__(self, config: GateConfig) -> None:
        super().__init__()
        self.config = config
        features = 2 * config.hidden_size
        self.norm = nn.LayerNorm(features)
        self.project = nn.Linear(features, config.width)
        self.layer_embedding = nn.Embedding(config.num_layers, config.width)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(config.width, 1))
        nn.init.zeros_(self.layer_embedding.weight)

    def forward(self, features: torch.Tensor, layer: torch.Tensor | int) -> torch.Tensor:
        """Exit logits ``[N]`` for features ``[N, 2 * hidden]`` at layer(s) ``layer``."""
        x = self.project(self.norm(features.to(self.norm.weight.dtype)))
        embedding = (
            self.layer_embedding.weight[layer] if isinstance(layer, int) else self.layer_embedding(layer)
        )
        return self.head(x + embedding).squeeze(-1)


def text_feature_masks(
    visual: torch.Tensor, padding: torch.Tensor | None, prompt_end: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the gate reads: the prompt's text after the last visual token, and the last prompt token.

    ``prompt_end[b]`` is one past the last prompt position (answers in teacher-forced training
    come after it and must not leak into a causal decision); by default the last real token.
    Returns ``(mean_mask [B, T] bool, last_index [B] long)``. When no text sits between the
    image and the last prompt token, the mean falls back to the last token alone.
    """
    batch, length = visual.shape
    positions = torch.arange(length, device=visual.device).expand(batch, -1)
    real = torch.ones_like(visual) if padding is None else padding.bool()
    if prompt_end is None:
        last = torch.where(real, positions, -1).max(dim=1).values
    else:
        last = prompt_end.to(visual.device) - 1
    last_visual = torch.where(visual, positions, -1).max(dim=1).values
    mean_mask = real & ~visual & (positions > last_visual.unsqueeze(1)) & (positions < last.unsqueeze(1))
    empty = ~mean_mask.any(dim=1)
    mean_mask = mean_mask | (empty.unsqueeze(1) & (positions == last.unsqueeze(1)))
    return mean_mask, last


def pooling_weights(mean_mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``[B, 2, T]``: row 0 averages the text under ``mean_mask``, row 1 picks the last prompt token.

    Built once per set of samples and reused at every layer, so asking the gate costs one batched
    matmul plus the router per layer (it must stay under 1% of prefill time).
    """
    mean = mean_mask.float()
    mean = mean / mean.sum(dim=1, keepdim=True).clamp_min(1.0)
    # A comparison, not one_hot: one_hot reads the indices' range back from the device.
    pick = (torch.arange(mean_mask.shape[1], device=last.device) == last.unsqueeze(1)).float()
    return torch.stack([mean, pick], dim=1)


def gate_features(
    hidden: torch.Tensor,
    mean_mask: torch.Tensor | None = None,
    last: torch.Tensor | None = None,
    pooling: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, 2D]`` = [mean of the text states under ``mean_mask`` ; state of the last prompt token]."""
    if pooling is None:
        pooling = pooling_weights(mean_mask, last)
    return torch.bmm(pooling.to(hidden.dtype), hidden.detach()).flatten(1)


class GateExitRule:
    """The gate as the engine's exit rule (``Reduction(exit_rule=...)``, inference).

    Called after each layer for the samples still reading visual tokens; fires for those whose
    ``p_exit >= tau`` once ``layer >= min_layer``. Decisions use only states that exist at that
    layer, so they are causal.
    """

    def __init__(self, gate: ExitGate, tau: float | None = None) -> None:
        self.lag = gate.config.lag  # the engine applies a decision made after layer l from l + 1 + lag
        # The engine reads lag and asked_layers to cut graph-captured prefill where decisions are taken.
        self.asked_layers = frozenset(gate.config.candidate_layers)
        self.gate = gate
        self.tau = gate.config.tau if tau is None else tau
        self.last_probabilities: dict[int, torch.Tensor] = {}
        self._pooling_for: tuple = ()
        self._pooling: torch.Tensor | None = None

    def __call__(self, layer, hidden, rows, visual, padding):
        if layer not in self.asked_layers:
            return None
        with torch.no_grad():
            p, fire = self.decide(layer, hidden, self.prepare(rows, visual, padding))
        self.observe(layer, p)
        return fire

    # The staged form (vtw_train.engine.reduction.StagedExitRule), recorded into graph-captured prefill.
    def prepare(self, rows: torch.Tensor, visual: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """The pooling weights of ``rows``. The engine hands over the same row/visual tensors until a sample
        exits, so the weights are reused until then."""
        key = (rows, visual, padding)
        if len(self._pooling_for) != 3 or any(
            a is not b for a, b in zip(self._pooling_for, key, strict=True)
        ):
            mean_mask, last = text_feature_masks(visual[rows], None if padding is None else padding[rows])
            self._pooling, self._pooling_for = pooling_weights(mean_mask, last), key
        return self._pooling

    def decide(
        self, layer: int, hidden: torch.Tensor, prepared: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.sigmoid(self.gate(gate_features(hidden, pooling=prepared), layer))
        return p, p >= self.tau

    def observe(self, layer: int, probability: torch.Tensor) -> None:
        self.last_probabilities[layer] = probability

    def graph_key(self) -> tuple:
        return id(self.gate), self.tau, tuple(p.data_ptr() for p in self.gate.parameters())


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"Unknown exit policy {policy!r}; use one of {', '.join(POLICIES)}.")


def gate_parameter_share(gate: ExitGate, model: nn.Module) -> float:
    """The gate's parameters as a fraction of the language model's."""
    lm = attach(model).language_model
    return sum(p.numel() for p in gate.parameters()) / sum(p.numel() for p in lm.parameters())


def policy_reduction(
    policy: Policy, gate: ExitGate | None, fixed_exit_layer: int | None, tau: float | None = None
) -> Reduction:
    """The engine reduction of an exit policy: the gate, the calibrated K, or the gate capped at K.

    Without a gate (or with policy ``fixed``) the calibrated fixed K is the fallback; with no
    calibrated K either, the full model runs.
    """
    check_policy(policy)
    if policy == "fixed" or gate is None:
        return Reduction(exit_layer=fixed_exit_layer)
    rule = GateExitRule(gate, tau=tau)
    if policy == "gate":
        return Reduction(exit_rule=rule)
    return Reduction(exit_rule=rule, exit_layer=fixed_exit_layer)
