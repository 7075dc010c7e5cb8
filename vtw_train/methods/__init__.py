"""Visual-token reduction methods that act outside the exit engine (METHODS.md §5-7)."""

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
    "ImagePruning",
    "PruneInfo",
    "TokenSelection",
    "VisPruner",
    "cls_attention_importance",
    "prune_visual_tokens",
    "received_attention_importance",
    "select_visual_tokens",
]
