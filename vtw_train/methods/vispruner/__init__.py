"""VisPruner: keep T visual tokens per image, chosen before the language model (docs/methods.md §5).

VisPruner decides which visual tokens the language model ever sees, from signals of the vision
encoder alone ([CLS] attention for importance, feature similarity for diversity). The LLM is
untouched and receives a shorter prompt, so prefill, the KV cache and decode all get cheaper, and
the exit engine composes with it unchanged. ``selection`` is the math, ``encoding`` the
per-family plumbing, ``prompt`` the input rewriting, ``pruner`` the facade.
"""

from .pruner import ImagePruning, PruneInfo, VisPruner, prune_visual_tokens
from .selection import (
    DIVERSITY_STEP,
    RandomSelection,
    TokenSelection,
    cls_attention_importance,
    received_attention_importance,
    select_visual_tokens,
)

__all__ = [
    "DIVERSITY_STEP",
    "ImagePruning",
    "PruneInfo",
    "RandomSelection",
    "TokenSelection",
    "VisPruner",
    "cls_attention_importance",
    "prune_visual_tokens",
    "received_attention_importance",
    "select_visual_tokens",
]
