"""VTW's fixed exit layer K by the KL criterion (VTW's ``--findk``, batched and shared-prefix).

For each candidate K, the divergence KL(P_K || P_full) between the withdrawn model's and the
full model's next-token distributions is averaged over N calibration samples; K is the first
candidate whose mean is at most the threshold eta (docs/methods.md §2.2). K = L always passes
(KL 0), so calibration never fails: it falls back to the full model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar

import torch
from torch import nn

from ..engine import attach
from ..engine.sweep import exit_sweep
from ..fingerprint import data_fingerprint, library_versions, model_fingerprint
from .kl import kl_divergence, log_probs, masked_mean
from .record import RecordFile
from .targets import Metric, target_positions

RECORD_FORMAT = "vtw-calibration/1"


@dataclass(frozen=True)
class VTWSetting:
    """VTW's calibration setting for one model: eta and the smallest candidate K, and where they come from."""

    threshold: float
    min_layer: int
    source: str


#: VTW's published eta per model (lzhxmu/VTW), keyed by (model_type, decoder layers, hidden size);
#: VTW searches K from 5 on these 32- and 40-layer models (docs/methods.md §2.2, §2.3).
VTW_SETTINGS: dict[tuple[str, int, int], VTWSetting] = {
    ("llava", 32, 4096): VTWSetting(0.003, 5, "VTW's eta for LLaVA-1.5-7B"),
    ("llava", 40, 5120): VTWSetting(0.0005, 5, "VTW's eta for LLaVA-1.5-13B"),
    ("llava_next", 32, 4096): VTWSetting(0.0001, 5, "VTW's eta for LLaVA-1.6-vicuna-7B"),
    # The embedded toy VLM: 8 layers of 128. Its answers are near one-hot, so one changed answer
    # costs nats, not millinats: its KL curve falls from >= 0.5 at K <= 5 to <= 0.005 at K = 6
    # on every calibration set, and 0.01 sits in that gap (docs/toy_vlm.md, "Withdrawal").
    ("llava", 8, 128): VTWSetting(0.01, 0, "the embedded toy's eta (chosen for it; docs/toy_vlm.md)"),
}
#: VTW's eta for models it lists no value for.
VTW_FALLBACK = VTWSetting(0.003, 0, "VTW's eta for unlisted models")


def vtw_setting(model: nn.Module) -> VTWSetting:
    """VTW's eta and smallest K for ``model`` (its published value where there is one, the fallback otherwise)."""
    from ..adapters import base_model_of

    config = base_model_of(model).config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    key = (str(getattr(config, "model_type", "")), int(text.num_hidden_layers), int(text.hidden_size))
    return VTW_SETTINGS.get(key, VTW_FALLBACK)


@dataclass
class CalibrationConfig:
    """Settings of the KL criterion."""

    threshold: float | None = None
    """eta. None: VTW's value for the model (0.003 LLaVA-1.5-7B, 0.0005 13B, 0.0001 LLaVA-1.6-7B; 0.003
    for unlisted models)."""
    num_samples: int = 20
    """Calibration samples averaged (VTW: 20)."""
    min_layer: int | None = None
    """Smallest candidate K. None: VTW's (5 on the models it lists, 0 otherwise)."""
    metric: Metric = "first_token"
    """``first_token`` (KL at the last prompt position, as VTW) or ``answer_mean`` (mean over the
    teacher-forced answer tokens; needs ``labels`` in the batches)."""

    def __post_init__(self) -> None:
        if self.threshold is not None and self.threshold < 0:
            raise ValueError(f"calibration threshold must be >= 0, got {self.threshold}.")
        if self.min_layer is not None and self.min_layer < 0:
            raise ValueError(f"calibration min_layer must be >= 0, got {self.min_layer}.")
        if self.num_samples < 1:
            raise ValueError(f"calibration num_samples must be >= 1, got {self.num_samples}.")
        if self.metric not in ("first_token", "answer_mean"):
            raise ValueError(
                f"calibration metric must be 'first_token' or 'answer_mean', got {self.metric!r}."
            )


@dataclass
class CalibrationRecord(RecordFile):
    """What a calibration found, saved as JSON next to checkpoints and checked by loaders."""

    FORMAT: ClassVar[str] = RECORD_FORMAT
    KIND: ClassVar[str] = "calibration record"
    HOW_TO_REMAKE: ClassVar[str] = "recalibrate with scripts/calibrate.py"

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
    threshold_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["kl_curve"] = {str(k): v for k, v in sorted(self.kl_curve.items())}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationRecord:
        data = dict(data)
        data["kl_curve"] = {int(k): float(v) for k, v in data["kl_curve"].items()}
        return cls(**data)

    def check(self, model: nn.Module, source: str = "calibration record") -> None:
        controller = attach(model)
        if controller.num_layers != self.num_layers:
            raise ValueError(
                f"{source} was made for a {self.num_layers}-layer decoder; this model has {controller.num_layers}."
            )
        super().check(model, source)


def kl_per_sample(
    model: nn.Module, batch: dict[str, torch.Tensor], candidates: list[int], metric: Metric
) -> dict[int, torch.Tensor]:
    """``{K: [B]}`` KL(P_K || P_full) per sample, averaged over its target positions."""
    positions, valid = target_positions(batch, metric)
    states = exit_sweep(model, batch, candidates, positions)
    head = model.get_output_embeddings()
    num_layers = max(states)
    full_logp = log_probs(head, states[num_layers])
    return {k: masked_mean(kl_divergence(log_probs(head, states[k]), full_logp), valid) for k in candidates}


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
    vtw = vtw_setting(model)
    threshold = vtw.threshold if config.threshold is None else config.threshold
    source = vtw.source if config.threshold is None else "set by the user"
    min_layer = vtw.min_layer if config.min_layer is None else config.min_layer
    if not 0 <= min_layer <= num_layers:
        raise ValueError(f"calibration min_layer={min_layer} is outside [0, {num_layers}].")
    candidates = list(range(min_layer, num_layers + 1))
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
            batch = _whole(batch, take)
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
    chosen = next(k for k in candidates if curve[k] <= threshold)
    return CalibrationRecord(
        exit_layer=chosen,
        threshold=threshold,
        threshold_source=source,
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


def _whole(batch: dict[str, torch.Tensor], take: int) -> dict[str, torch.Tensor]:
    """The batch itself when all of it is needed; a partial batch would split its images."""
    size = batch["input_ids"].shape[0]
    if take == size:
        return batch
    raise ValueError(
        f"Calibration needs whole batches: num_samples must be a multiple of the batch size ({size}), "
        f"or use batch size 1."
    )
