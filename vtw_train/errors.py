"""Exceptions raised by vtw-train.

They subclass ``ValueError`` so that code written against plain transformers, which
catches ``ValueError`` for bad arguments, keeps working, while callers that care can
catch the precise type.
"""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """The model class has no withdrawal adapter. The message names the supported classes."""


class WithdrawalError(ValueError):
    """An input or setting that the withdrawal engine cannot honour; the message says how to fix it."""
