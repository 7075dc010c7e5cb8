"""Peer methods that plug into the engine: VisPruner (before the LLM) and FastV (inside it).

ShortV's frozen-layer kernel is part of the engine (``Reduction.frozen_layers``) and its Layer
Contribution is a calibration (``vtw_train.calibration.layer_contribution``); the learned gate
is ``vtw_train.gate``.
"""

from .fastv import FastV
from .vispruner import (
    ImagePruning,
    PruneInfo,
    TokenSelection,
    VisPruner,
    cls_attention_importance,
    prune_visual_tokens,
    received_attention_importance,
    select_visual_tokens,
)

__all__ = [
    "FastV",
    "ImagePruning",
    "PruneInfo",
    "TokenSelection",
    "VisPruner",
    "cls_attention_importance",
    "prune_visual_tokens",
    "received_attention_importance",
    "select_visual_tokens",
]
