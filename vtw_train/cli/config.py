"""Typed YAML configs for the scripts.

Each script's config is a dataclass; jsonargparse reads the YAML against it, so a misspelt
key or a wrong type fails with a message naming the key, and every field can also be set on
the command line (``--calibration.threshold 0.01``). LightningCLI uses the same machinery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from jsonargparse import ActionConfigFile, ArgumentParser

T = TypeVar("T")


def config_parser(cls: type, prog: str, description: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with the settings below.")
    parser.add_class_arguments(cls)
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None, prog: str, description: str) -> T:
    """Parse ``--config file.yaml`` plus per-key overrides into an instance of ``cls``."""
    parser = config_parser(cls, prog, description)
    namespace = parser.parse_args(None if argv is None else list(argv))
    namespace.pop("config", None)
    return cls(**vars(parser.instantiate(namespace)))
