"""vtw-train: withdraw visual tokens from multimodal LLM decoders once they stop mattering.

The engine is imported eagerly (it is small); training, checkpoints and methods load on
first use so that ``import vtw_train`` does not pull in Lightning or peft.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .engine import (
    FULL,
    ExitController,
    GraphSettings,
    Reduction,
    WithdrawalCache,
    attach,
    controller_of,
    supported_model_classes,
)
from .errors import UnsupportedModelError, WithdrawalError

__version__ = "0.1.0"

_LAZY = {
    "calibrate": ("vtw_train.calibration", "calibrate"),
    "CalibrationConfig": ("vtw_train.calibration", "CalibrationConfig"),
    "CalibrationRecord": ("vtw_train.calibration", "CalibrationRecord"),
    "layer_contribution": ("vtw_train.calibration", "layer_contribution"),
    "GatedVLM": ("vtw_train.checkpoint", "GatedVLM"),
    "export_gated_checkpoint": ("vtw_train.checkpoint", "export_gated_checkpoint"),
    "ExitGate": ("vtw_train.gate", "ExitGate"),
    "GateConfig": ("vtw_train.gate", "GateConfig"),
    "VisPruner": ("vtw_train.methods", "VisPruner"),
    "FastV": ("vtw_train.methods", "FastV"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'vtw_train' has no attribute {name!r}")


__all__ = [
    "FULL",
    "ExitController",
    "GraphSettings",
    "Reduction",
    "UnsupportedModelError",
    "WithdrawalCache",
    "WithdrawalError",
    "__version__",
    "attach",
    "controller_of",
    "supported_model_classes",
    *_LAZY,
]
