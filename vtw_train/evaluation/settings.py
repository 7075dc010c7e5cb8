"""The harness's own knobs (generation, timing, calibration), typed for the YAML config.

They live apart from the strategy sweep because they say *how* every strategy is measured,
which must be identical across strategies for the comparison to mean anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class GenerationSettings:
    """Greedy decoding of the answers."""

    batch_size: int = 32
    """Prompts per ``generate`` call."""
    max_new_tokens: int = 8
    """Answers are one or two words; a few tokens more only cost decode time."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"generation.batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class TimingSettings:
    """Prefill timing: one fixed batch (the first ``batch_size`` evaluated prompts) per strategy.

    All strategies run round-robin and are compared by medians, because these machines drift
    between runs. The KV-cache size is measured even when timing is skipped.
    """

    batch_size: int = 16
    """Prompts in the timed batch."""
    repeats: int = 5
    """Timed interleaved rounds (0: skip timing; the time ratios are then reported as missing)."""
    warmup: int = 1
    """Untimed rounds first."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"timing.batch_size must be >= 1, got {self.batch_size}")
        if self.repeats < 0 or self.warmup < 0:
            raise ValueError(
                f"timing.repeats and timing.warmup must be >= 0, got {self.repeats}, {self.warmup}"
            )


@dataclass
class CalibrationSettings:
    """Calibration of VTW's K (KL criterion) and ShortV's Layer Contribution, on samples that are not evaluated."""

    threshold: float | None = None
    """eta of VTW's rule (first-token KL). None: VTW's value for the model (0.003 for LLaVA-1.5-7B and
    unlisted models, 0.0005 13B, 0.0001 LLaVA-1.6-7B)."""
    num_samples: int = 20
    """Samples for the K calibration (VTW: 20)."""
    metric: Literal["first_token", "answer_mean"] = "first_token"
    """The metric of the row named "VTW calibrated": VTW's first-token KL, or our answer-token mean."""
    min_layer: int | None = None
    """Smallest candidate K. None: VTW's (5 on the models it lists, 0 otherwise)."""
    answer_threshold: float = 0.01
    """eta of our answer-token variant (``strategies.vtw_answer_calibrated``): mean KL over the
    teacher-forced answer tokens."""
    shortv_samples: int = 20
    """Samples for Layer Contribution."""
    batch_size: int = 10
    """Calibration batch size."""
    record: str | None = None
    """An existing calibration record (JSON) to use instead of calibrating."""

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.shortv_samples < 1:
            raise ValueError(
                f"calibration.num_samples and calibration.shortv_samples must be >= 1, "
                f"got {self.num_samples}, {self.shortv_samples}"
            )
        if self.batch_size < 1:
            raise ValueError(f"calibration.batch_size must be >= 1, got {self.batch_size}")
        for name in ("threshold", "min_layer", "answer_threshold"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"calibration.{name} must be >= 0, got {value}")

    @property
    def samples_needed(self) -> int:
        return max(self.num_samples, self.shortv_samples)
