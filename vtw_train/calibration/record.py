"""What a calibration found, as a small JSON file that loaders check before trusting it.

Both calibrations (VTW's exit layer and ShortV's Layer Contribution) are only valid for the
model they were measured on, so both records carry the model's fingerprint, are written
atomically and refuse files of another format or with unknown keys. This base holds that.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from torch import nn

from ..atomic_write import write_text_atomically
from ..fingerprint import model_fingerprint

R = TypeVar("R", bound="RecordFile")


class RecordFile:
    """Mixin for dataclass records with a ``format`` tag and a ``model_fingerprint``.

    Subclasses set ``FORMAT`` (the value of their ``format`` field), ``KIND`` (how errors name
    the file) and ``HOW_TO_REMAKE`` (the command that writes a fresh one).
    """

    FORMAT: ClassVar[str]
    KIND: ClassVar[str]
    HOW_TO_REMAKE: ClassVar[str]
    model_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a crash never leaves a half-written record behind."""
        return write_text_atomically(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        return cls(**data)

    @classmethod
    def load(cls: type[R], path: str | os.PathLike, model: nn.Module | None = None) -> R:
        """Read a record; with ``model``, check that it was made for this model."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{cls.KIND} {path} does not exist; {cls.HOW_TO_REMAKE}.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{cls.KIND} {path} is not valid JSON ({err}); {cls.HOW_TO_REMAKE}.") from err
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ValueError(f"{path} is not a vtw-train {cls.KIND} (format {found!r}).")
        unknown = set(data) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"{cls.KIND} {path} has unknown keys {sorted(unknown)}.")
        record = cls.from_dict(data)
        if model is not None:
            record.check(model, source=str(path))
        return record

    def check(self, model: nn.Module, source: str = "") -> None:
        """Refuse a record made for another model (the fingerprint covers weights, shapes and dtype)."""
        found = model_fingerprint(model)
        if found != self.model_fingerprint:
            raise ValueError(
                f"{source or self.KIND} was made for a different base model (fingerprint "
                f"{self.model_fingerprint[:19]}..., this model {found[:19]}...). {self.HOW_TO_REMAKE[0].upper()}"
                f"{self.HOW_TO_REMAKE[1:]}."
            )
