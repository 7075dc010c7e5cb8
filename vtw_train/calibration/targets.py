"""Which prompt positions a calibration compares: the one that predicts the first answer token, or all answer positions."""

from __future__ import annotations

from typing import Literal

import torch

Metric = Literal["first_token", "answer_mean"]


def target_positions(batch: dict[str, torch.Tensor], metric: Metric) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose next-token distributions are compared, and a validity mask ``[B, P]``.

    first_token: the position that predicts the first answer token (the last prompt token);
    without labels, the last real token. answer_mean: every position that predicts an
    answer token.
    """
    ids = batch["input_ids"]
    bsz, length = ids.shape
    labels = batch.get("labels")
    if labels is None:
        if metric == "answer_mean":
            raise ValueError("calibration metric 'answer_mean' needs batches with 'labels' (answer tokens).")
        mask = batch.get("attention_mask")
        if mask is None:
            last = torch.full((bsz,), length - 1, dtype=torch.long, device=ids.device)
        else:
            positions = torch.arange(length, device=ids.device).expand(bsz, -1)
            last = torch.where(mask.bool(), positions, -1).max(dim=1).values
        return last.unsqueeze(1), torch.ones(bsz, 1, dtype=torch.bool, device=ids.device)
    predicts = labels[:, 1:] != -100  # position t predicts token t+1
    if not bool(predicts.any(dim=1).all()):
        raise ValueError("Every calibration sample needs at least one answer token in 'labels'.")
    if metric == "first_token":
        first = predicts.float().argmax(dim=1)
        return first.unsqueeze(1), torch.ones(bsz, 1, dtype=torch.bool, device=ids.device)
    count = int(predicts.sum(dim=1).max())
    order = torch.argsort((~predicts).to(torch.int8), dim=1, stable=True)[:, :count]
    valid = torch.arange(count, device=ids.device).unsqueeze(0) < predicts.sum(dim=1, keepdim=True)
    return torch.where(valid, order, order[:, :1]), valid


def states_at(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden [B, T, D]`` gathered at ``positions [B, P]`` -> ``[B, P, D]``."""
    return torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
