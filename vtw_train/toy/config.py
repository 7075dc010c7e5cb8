"""Typed configuration of the toy VLM build (read through ``vtw_train.config``; a wrong key fails naming it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtw_train.config import ConfigError, config_from_dict, load_config_file
from vtw_train.data.synthetic import KNOWN_QUESTION_TYPES
from vtw_train.toy.build import ToyArchConfig
from vtw_train.toy.vision_pretrain import VisionPretrainConfig


@dataclass
class PhaseConfig:
    """A stretch of training with its own question-type mix (a curriculum step)."""

    until_fraction: float
    """The phase lasts while step < until_fraction * train.steps."""
    type_weights: dict[str, float]
    """Relative weight of each question type drawn in this phase."""
    min_objects: int = 2
    """Fewest objects per scene."""
    max_objects: int = 5
    """Most objects per scene."""


@dataclass
class TrainConfig:
    """Stage 1: projector and decoder trained on fresh synthetic conversations."""

    seed: int = 0
    """Seed of the model's initialisation and of the training data stream."""
    steps: int = 3000
    """Optimizer steps."""
    batch_size: int = 32
    """Scenes per step."""
    questions_per_image: int = 1
    """Questions asked about each training image, as one multi-turn conversation (answers are 1-2
    tokens, so more questions per image give more signal per step)."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 30
    """Linear warmup steps."""
    flat_fraction: float = 0.7
    """Fraction of the run held at the peak learning rate before the cosine decay."""
    min_lr_ratio: float = 0.02
    """Final learning rate as a fraction of the peak."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clip."""
    threads: int = 1
    """torch threads for the build (the committed weights depend on it: keep it to reproduce them)."""
    data_workers: int = 1
    """Processes that generate and collate the next batches while the model trains (0: the training
    process does it between steps). Batches and weights do not depend on it. At most 1: the
    batches come from one ordered generator stream."""
    eval_every: int = 500
    """Steps between monitor evaluations."""
    eval_samples: int = 700
    """Monitor samples (teacher-forced exact match)."""
    eval_seed: int = 12345
    """Held-out seed used for monitoring; never used for training samples."""
    checkpoint_every: int = 500
    """Steps between resumable checkpoints."""
    curriculum: list[PhaseConfig] = field(default_factory=list)
    """Curriculum phases, in order; after the last one the default question mix is drawn."""

    def __post_init__(self) -> None:
        if self.data_workers not in (0, 1):
            raise ValueError(
                f"train.data_workers must be 0 or 1 (the batches come from one ordered generator stream), "
                f"got {self.data_workers}"
            )
        # A misspelt type would otherwise fail only when its phase starts, deep into a build.
        for i, phase in enumerate(self.curriculum):
            unknown = sorted(set(phase.type_weights) - set(KNOWN_QUESTION_TYPES))
            if unknown:
                raise ValueError(
                    f"train.curriculum[{i}].type_weights: unknown question type(s) {unknown}; "
                    f"known: {list(KNOWN_QUESTION_TYPES)}"
                )


@dataclass
class ToyBuildConfig:
    """The whole toy VLM build: architecture, stage 0 (the vision tower), stage 1 (the VLM)."""

    arch: ToyArchConfig = field(default_factory=ToyArchConfig)
    """Architecture of the toy VLM."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Stage 1: the VLM's supervised training."""
    vision_pretrain: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)
    """Stage 0: the vision tower learns to describe each patch before the VLM trains."""
    output_dir: str | None = None
    """Where the model is written; null means the packaged ``vtw_train/toy/toy_vlm``."""


def config_from_checkpoint(data: dict[str, Any]) -> ToyBuildConfig:
    """A config from its ``dataclasses.asdict`` form, as stored in a checkpoint."""
    return config_from_dict(ToyBuildConfig, data, source="the checkpoint's config")


def load_config(path: str | Path | None) -> ToyBuildConfig:
    """Read a YAML file into :class:`ToyBuildConfig` (defaults when ``path`` is None)."""
    if path is None:
        return ToyBuildConfig()
    return load_config_file(ToyBuildConfig, path)


__all__ = [
    "ConfigError",
    "PhaseConfig",
    "ToyBuildConfig",
    "TrainConfig",
    "config_from_checkpoint",
    "load_config",
]
