"""Calibration: VTW's exit layer K and ShortV's Layer Contribution, measured on a handful of samples.

Both are last-token (or answer-token) KL measurements on the engine, both produce a record that
is only valid for the model it was made on, and both run on samples that are not evaluated.
"""

from .batches import calibration_batches
from .exit_layer import (
    VTW_FALLBACK,
    VTW_SETTINGS,
    CalibrationConfig,
    CalibrationRecord,
    VTWSetting,
    calibrate,
    kl_per_sample,
    vtw_setting,
)
from .kl import kl_divergence, log_probs, masked_mean
from .layer_contribution import ShortVRecord, layer_contribution
from .targets import Metric, states_at, target_positions

__all__ = [
    "CalibrationConfig",
    "CalibrationRecord",
    "Metric",
    "ShortVRecord",
    "VTWSetting",
    "VTW_FALLBACK",
    "VTW_SETTINGS",
    "calibrate",
    "calibration_batches",
    "kl_divergence",
    "kl_per_sample",
    "layer_contribution",
    "log_probs",
    "masked_mean",
    "states_at",
    "target_positions",
    "vtw_setting",
]
