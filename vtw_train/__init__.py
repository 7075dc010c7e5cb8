"""vtw-train: withdraw visual tokens from multimodal LLM decoders once they stop mattering."""

from .engine import ExitController, WithdrawalCache, attach, controller_of, supported_model_classes
from .errors import UnsupportedModelError, WithdrawalError

__version__ = "0.1.0"

__all__ = [
    "ExitController",
    "UnsupportedModelError",
    "WithdrawalCache",
    "WithdrawalError",
    "__version__",
    "attach",
    "controller_of",
    "supported_model_classes",
]
