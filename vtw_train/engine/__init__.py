"""The engine: reduce visual tokens inside the text decoder (exit after layer K, freeze, prune).

``attach(model)`` installs it; the returned controller applies one :class:`Reduction` at a
time. The engine imports no method: methods plug in through :class:`InLayerPruning`,
:class:`InputPruner` and :data:`ExitRule`.
"""

from .cache import ExitState, WithdrawalCache, kv_bytes
from .controller import ExitController, attach, controller_of
from .families import supported_model_classes
from .graphs import GraphSettings, GraphStats, SegmentGraphs
from .layout import TextLayout, build_text_layout
from .reduction import FULL, ExitRule, InLayerPruning, InputPruner, Reduction, StagedExitRule

__all__ = [
    "FULL",
    "ExitController",
    "ExitRule",
    "ExitState",
    "GraphSettings",
    "GraphStats",
    "InLayerPruning",
    "InputPruner",
    "Reduction",
    "SegmentGraphs",
    "StagedExitRule",
    "TextLayout",
    "WithdrawalCache",
    "attach",
    "build_text_layout",
    "controller_of",
    "kv_bytes",
    "supported_model_classes",
]
