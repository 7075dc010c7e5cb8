"""KL divergence between two runs' next-token distributions: the one measure every calibration shares.

VTW's K (docs/methods.md §2.2), ShortV's Layer Contribution (§6.2), the gate's training labels
and the distillation loss (§4) all compare a reduced run with the full one position by position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def log_probs(head: nn.Module, states: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-softmax of the LM head over final-normed ``states``, in float32."""
    logits = head(states).float()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last (vocabulary) dimension, from log-probabilities of the same shape.

    VTW's reference writes ``KLDivLoss(log_softmax(full), softmax(exit))``, which is KL(P_exit || P_full):
    pass the reduced run as ``log_p`` and the full run as ``log_q`` to reproduce it.
    """
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of ``values [B, P]`` over its valid positions."""
    weights = valid.to(values.dtype)
    return (values * weights).sum(1) / weights.sum(1)
