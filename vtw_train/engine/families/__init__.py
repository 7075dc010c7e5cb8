"""Registry of supported model families, keyed on the model's class name.

Unknown classes fail loudly (docs/methods.md §1.4: silent fall-through on unknown models broke
other projects' configs). To add a family, write an adapter module and list it here.
"""

from __future__ import annotations

from torch import nn

from ...adapters import base_model_of
from ...errors import UnsupportedModelError
from .base import FamilyAdapter, SplitPositions
from .llava import LlavaAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS: tuple[FamilyAdapter, ...] = (LlavaAdapter(), Qwen2VLAdapter())


def supported_model_classes() -> tuple[str, ...]:
    return tuple(name for adapter in ADAPTERS for name in adapter.model_classes)


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """Return the adapter for ``model`` or raise :class:`UnsupportedModelError`."""
    name = type(base_model_of(model)).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            return adapter
    raise UnsupportedModelError(
        f"vtw-train has no withdrawal adapter for {name}. Supported: {', '.join(supported_model_classes())}. "
        "To add a family, write an adapter in vtw_train/engine/families/ (see README, 'Adding a model family')."
    )


__all__ = ["ADAPTERS", "FamilyAdapter", "SplitPositions", "adapter_for", "supported_model_classes"]
