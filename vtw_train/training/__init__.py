"""Training the exit gate and LoRA adapters: the objective, the Lightning module, metrics and logging.

The Lightning module is imported on first use, so that the objective works without Lightning.
"""

from __future__ import annotations

from typing import Any

from .objective import DistillConfig, StepOutput, distill_step


def __getattr__(name: str) -> Any:
    if name == "GateDistillModule":
        from .module import GateDistillModule

        return GateDistillModule
    raise AttributeError(f"module 'vtw_train.training' has no attribute {name!r}")


__all__ = ["DistillConfig", "GateDistillModule", "StepOutput", "distill_step"]
