"""The harness's own knobs (generation, timing, calibration), typed for the YAML config.

They live apart from the strategy sweep because they say *how* every strategy is measured,
which must be identical across strategies for the comparison to mean anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class GenerationSettings:
    """Greedy decoding of the answers.

    batch_size: prompts per ``generate`` call.
    max_new_tokens: answers are one or two words; a few tokens more only cost decode time.
    """

    batch_size: int = 32
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"generation.batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class TimingSettings:
    """Prefill timing: one fixed batch (the first ``batch_size`` evaluated prompts) per strategy.

    All strategies run round-robin (``repeats`` rounds after ``warmup`` untimed ones) and are
    compared by medians, because these machines drift between runs. ``repeats: 0`` skips
    timing (the time ratios are then reported as missing); the KV-cache size is still measured.
    """

    batch_size: int = 16
    repeats: int = 5
    warmup: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"timing.batch_size must be >= 1, got {self.batch_size}")
        if self.repeats < 0 or self.warmup < 0:
            raise ValueError(
                f"timing.repeats and timing.warmup must be >= 0, got {self.repeats}, {self.warmup}"
            )


@dataclass
class CalibrationSettings:
    """Calibration of VTW's K (KL criterion) and ShortV's Layer Contribution, on samples that are not evaluated.

    threshold / metric / min_layer: the KL criterion (``vtw_train.calibrate.CalibrationConfig``).
    num_samples: samples for the K calibration; shortv_samples: for Layer Contribution.
    batch_size: calibration batch size.
    record: an existing calibration record (JSON) to use instead of calibrating.
    """

    threshold: float = 0.01
    num_samples: int = 20
    metric: Literal["first_token", "answer_mean"] = "answer_mean"
    min_layer: int = 0
    shortv_samples: int = 20
    batch_size: int = 10
    record: str | None = None

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.shortv_samples < 1:
            raise ValueError(
                f"calibration.num_samples and calibration.shortv_samples must be >= 1, "
                f"got {self.num_samples}, {self.shortv_samples}"
            )
        if self.batch_size < 1:
            raise ValueError(f"calibration.batch_size must be >= 1, got {self.batch_size}")

    @property
    def samples_needed(self) -> int:
        return max(self.num_samples, self.shortv_samples)
