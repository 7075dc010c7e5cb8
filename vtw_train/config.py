"""Typed configuration for every command: plain dataclasses, read by jsonargparse.

Why one system: a YAML file, a command-line override (``--calibration.threshold 0.01``) and a
dict stored in a checkpoint all go through the same typed parse, so a misspelt key or a wrong
type fails with a message naming the key, wherever it came from, and ``--help`` shows each
field's docstring (the string under the field). LightningCLI, which ``vtw-train train`` uses,
is built on the same parser.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jsonargparse
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter
from jsonargparse.typing import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

T = TypeVar("T")

# Field docstrings (a string literal under each dataclass field) become the --help text.
jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)


#: Value ranges for config fields: the parser refuses a value outside them, naming the key, before
#: anything runs (``--model.gate_tau 1.5``, ``--model.lora_r -3``).
Probability = restricted_number_type("Probability", float, [(">", 0), ("<=", 1)])
"""A threshold in (0, 1]."""
Fraction = restricted_number_type("Fraction", float, [(">=", 0), ("<", 1)])
"""A share in [0, 1)."""

__all__ = [
    "ConfigError",
    "Fraction",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "PositiveInt",
    "Probability",
    "config_from_dict",
    "config_parser",
    "load_config_file",
    "parse_config",
]


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, keeping the line breaks of a command's description (its examples)."""


class ConfigError(ValueError):
    """A config file or dict that does not fit its dataclass; the message names the key."""


def config_parser(cls: type, prog: str, description: str) -> ArgumentParser:
    """``--config file.yaml`` plus one option per field of ``cls`` (nested dataclasses as ``a.b``)."""
    parser = ArgumentParser(prog=prog, description=description, formatter_class=_HelpFormatter)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with the settings below.")
    parser.add_class_arguments(cls)
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None, prog: str, description: str) -> T:
    """Parse ``--config file.yaml`` plus per-key overrides into an instance of ``cls``.

    On a bad key or value, prints the usage and the error (naming the key) and exits with 2.
    """
    parser = config_parser(cls, prog, description)
    namespace = parser.parse_args(None if argv is None else list(argv))
    namespace.pop("config", None)
    try:
        return cls(**vars(parser.instantiate(namespace)))
    except (TypeError, ValueError) as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def config_from_dict(cls: type[T], data: Mapping[str, Any], source: str = "config") -> T:
    """``cls`` from a plain dict (parsed YAML, or ``dataclasses.asdict`` stored with a checkpoint).

    Raises :class:`ConfigError` naming the key (``train.lr_typo``) and ``source``.
    """
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls)
    try:
        namespace = parser.parse_object(dict(data))
        return cls(**vars(parser.instantiate(namespace)))
    except (argparse.ArgumentError, jsonargparse.ArgumentError) as err:
        raise ConfigError(f"{source}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config_file(cls: type[T], path: str | Path) -> T:
    """``cls`` from a YAML file; :class:`ConfigError` names the file and the key on a mistake."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}.")
    return config_from_dict(cls, data, source=str(path))
