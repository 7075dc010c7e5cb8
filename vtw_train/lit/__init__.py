"""Training the exit gate and LoRA adapters with Lightning."""

from .module import GateDistillModule

__all__ = ["GateDistillModule"]
