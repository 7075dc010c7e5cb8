"""KL calibration of the fixed exit layer K (VTW's ``--findk``, batched and shared-prefix).

For each candidate K, the divergence KL(P_K || P_full) between the withdrawn model's and the
full model's next-token distributions is averaged over N calibration samples; K is the first
candidate whose mean is at most the threshold eta. KL(P_K || P_full) is what the reference's
``KLDivLoss(log_softmax(full), softmax(exit))`` computes (METHODS.md §2.2). K = L always
passes (KL 0), so calibration never fails: it falls back to the full model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .atomic_write import write_text_atomically
from .engine.controller import attach
from .engine.sweep import exit_sweep
from .fingerprint import data_fingerprint, model_fingerprint

RECORD_FORMAT = "vtw-calibration/1"
Metric = Literal["first_token", "answer_mean"]


@dataclass
class CalibrationConfig:
    """Settings of the KL criterion.

    threshold: eta; VTW uses 0.003 for LLaVA-1.5-7B and unlisted models.
    num_samples: calibration samples averaged (VTW: 20).
    min_layer: smallest candidate K (VTW searches from 5 on a 32-layer model).
    metric: ``first_token`` (KL at the last prompt position, as VTW) or ``answer_mean``
        (mean over the teacher-forced answer tokens; needs ``labels`` in the batches).
    """

    threshold: float = 0.003
    num_samples: int = 20
    min_layer: int = 0
    metric: Metric = "first_token"

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"calibration threshold must be >= 0, got {self.threshold}.")
        if self.num_samples < 1:
            raise ValueError(f"calibration num_samples must be >= 1, got {self.num_samples}.")
        if self.metric not in ("first_token", "answer_mean"):
            raise ValueError(
                f"calibration metric must be 'first_token' or 'answer_mean', got {self.metric!r}."
            )


@dataclass
class CalibrationRecord:
    """What a calibration found, saved as JSON next to checkpoints and checked by loaders."""

    exit_layer: int
    threshold: float
    metric: str
    num_layers: int
    num_samples: int
    kl_curve: dict[int, float]
    model_fingerprint: str
    data_fingerprint: str
    candidate_layers: list[int] = field(default_factory=list)
    format: str = RECORD_FORMAT
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["kl_curve"] = {str(k): v for k, v in sorted(self.kl_curve.items())}
        return json.dumps(data, indent=2)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a crash never leaves a half-written record behind."""
        return write_text_atomically(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> CalibrationRecord:
        """Read a record; with ``model``, check that it was made for this model."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Calibration record {path} does not exist; run scripts/calibrate.py first."
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"Calibration record {path} is not valid JSON ({err}); recalibrate.") from err
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"{path} is not a vtw-train calibration record (format {data.get('format')!r}).")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Calibration record {path} has unknown keys {sorted(unknown)}.")
        data["kl_curve"] = {int(k): float(v) for k, v in data["kl_curve"].items()}
        record = cls(**data)
        if model is not None:
            record.check(model, source=str(path))
        return record

    def check(self, model: nn.Module, source: str = "calibration record") -> None:
        controller = attach(model)
        if controller.num_layers != self.num_layers:
            raise ValueError(
                f"{source} was made for a {self.num_layers}-layer decoder; this model has {controller.num_layers}."
            )
        found = model_fingerprint(model)
        if found != self.model_fingerprint:
            raise ValueError(
                f"{source} was made for a different base model (fingerprint {self.model_fingerprint[:19]}..., "
                f"this model {found[:19]}...). Recalibrate with scripts/calibrate.py."
            )


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


def kl_per_sample(
    model: nn.Module, batch: dict[str, torch.Tensor], candidates: list[int], metric: Metric
) -> dict[int, torch.Tensor]:
    """``{K: [B]}`` KL(P_K || P_full) per sample, averaged over its target positions."""
    positions, valid = target_positions(batch, metric)
    states = exit_sweep(model, batch, candidates, positions)
    head = model.get_output_embeddings()
    num_layers = max(states)
    full_logp = F.log_softmax(head(states[num_layers]).float(), dim=-1)
    out = {}
    for k in candidates:
        exit_logp = F.log_softmax(head(states[k]).float(), dim=-1)
        kl = (exit_logp.exp() * (exit_logp - full_logp)).sum(-1)  # [B, P]
        out[k] = (kl * valid).sum(1) / valid.sum(1)
    return out


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    config: CalibrationConfig | None = None,
) -> CalibrationRecord:
    """Pick the fixed exit layer K by the KL criterion on the first ``num_samples`` samples."""
    config = config or CalibrationConfig()
    controller = attach(model)
    num_layers = controller.num_layers
    if not 0 <= config.min_layer <= num_layers:
        raise ValueError(f"calibration min_layer={config.min_layer} is outside [0, {num_layers}].")
    candidates = list(range(config.min_layer, num_layers + 1))
    was_training = model.training
    model.eval()
    used: list[dict[str, torch.Tensor]] = []
    sums = {k: 0.0 for k in candidates}
    seen = 0
    try:
        for batch in batches:
            if seen >= config.num_samples:
                break
            take = min(config.num_samples - seen, batch["input_ids"].shape[0])
            batch = _head(batch, take)
            kls = kl_per_sample(model, batch, candidates, config.metric)
            for k in candidates:
                sums[k] += float(kls[k].sum())
            seen += take
            used.append(batch)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("Calibration got no samples: the data iterable was empty.")
    curve = {k: sums[k] / seen for k in candidates}
    chosen = next(k for k in candidates if curve[k] <= config.threshold)
    return CalibrationRecord(
        exit_layer=chosen,
        threshold=config.threshold,
        metric=config.metric,
        num_layers=num_layers,
        num_samples=seen,
        kl_curve=curve,
        model_fingerprint=model_fingerprint(model),
        data_fingerprint=data_fingerprint(used),
        candidate_layers=candidates,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=library_versions(),
    )


def _head(batch: dict[str, torch.Tensor], take: int) -> dict[str, torch.Tensor]:
    """The first ``take`` samples of a batch (images included only when cleanly divisible)."""
    size = batch["input_ids"].shape[0]
    if take == size:
        return batch
    raise ValueError(
        f"Calibration needs whole batches: num_samples must be a multiple of the batch size ({size}), "
        f"or use batch size 1."
    )


def library_versions() -> dict[str, str]:
    import peft
    import transformers

    from . import __version__

    return {
        "vtw-train": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
