"""Typed configuration of the toy VLM build; unknown YAML keys fail loudly, naming the key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from vtw_train.data.synthetic import KNOWN_QUESTION_TYPES
from vtw_train.toy.build import ToyArchConfig
from vtw_train.toy.vision_pretrain import VisionPretrainConfig


@dataclass
class PhaseConfig:
    """A stretch of training with its own question-type mix (a curriculum step)."""

    until_fraction: float
    type_weights: dict[str, float]
    min_objects: int = 2
    max_objects: int = 5

    def __post_init__(self) -> None:
        # A misspelt type would otherwise fail only when the phase starts, deep into a build.
        unknown = sorted(set(self.type_weights) - set(KNOWN_QUESTION_TYPES))
        if unknown:
            raise ValueError(
                f"type_weights: unknown question type(s) {unknown}; known: {list(KNOWN_QUESTION_TYPES)}"
            )


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 3000
    batch_size: int = 32
    #: Questions asked about each training image, as one multi-turn conversation (the
    #: answers are 1-2 tokens, so more questions per image give more signal per step).
    questions_per_image: int = 1
    lr: float = 3e-4
    warmup_steps: int = 30
    #: Fraction of the run held at the peak learning rate before the cosine decay.
    flat_fraction: float = 0.7
    min_lr_ratio: float = 0.02
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    threads: int = 1
    eval_every: int = 500
    eval_samples: int = 700
    #: Held-out seed used for monitoring; never used for training samples.
    eval_seed: int = 12345
    checkpoint_every: int = 500
    curriculum: list[PhaseConfig] = field(default_factory=list)


@dataclass
class ToyBuildConfig:
    arch: ToyArchConfig = field(default_factory=ToyArchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    #: Stage 0: the vision tower learns to describe each patch before the VLM trains.
    vision_pretrain: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)
    #: Where the model is written; null means the packaged ``vtw_train/toy/toy_vlm``.
    output_dir: str | None = None


def _build(cls: type, data: Any, where: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        return data
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise KeyError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; valid: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        hint = hints[k]
        sub = f"{where}.{k}" if where else k
        if dataclasses.is_dataclass(hint):
            kwargs[k] = _build(hint, v, sub)
        elif k == "curriculum":
            kwargs[k] = [_build(PhaseConfig, p, f"{sub}[{i}]") for i, p in enumerate(v or [])]
        elif k == "betas":
            kwargs[k] = tuple(float(x) for x in v)
        else:
            kwargs[k] = v
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ValueError(f"{where}: {err}" if where else str(err)) from None


def config_from_dict(data: dict) -> ToyBuildConfig:
    """A config from its ``dataclasses.asdict`` form (as stored in a checkpoint) or parsed YAML."""
    return _build(ToyBuildConfig, data, "")


def load_config(path: str | Path | None) -> ToyBuildConfig:
    """Read a YAML file into :class:`ToyBuildConfig` (defaults when ``path`` is None)."""
    if path is None:
        return ToyBuildConfig()
    data = yaml.safe_load(Path(path).read_text()) or {}
    return config_from_dict(data)
