"""The exit engine: withdraw visual tokens from the text decoder after layer K."""

from .cache import ExitState, WithdrawalCache
from .controller import DynamicExit, ExitController, attach, controller_of
from .families import supported_model_classes
from .layout import TextLayout, build_text_layout

__all__ = [
    "DynamicExit",
    "ExitController",
    "ExitState",
    "TextLayout",
    "WithdrawalCache",
    "attach",
    "build_text_layout",
    "controller_of",
    "supported_model_classes",
]
