"""Reader for LLaVA-format conversation data (JSON list or JSONL).

Why strict: a silently dropped sample skews every accuracy and calibration figure built on
the data. Every problem (bad JSON, empty conversation, missing or unreadable image, a
``<image>`` count that does not match the images) is either raised naming the file and line,
or -- with ``on_error="skip"`` -- skipped and counted in :attr:`LlavaJsonDataset.skipped`.

Record format (as in LLaVA-1.5's ``llava_v1_5_mix665k.json``)::

    {"id": "...", "image": "images/0001.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                       {"from": "gpt", "value": "..."}],
     "question_type": "count"}          # optional, used for per-type metrics

``image`` may also be a list of paths, or absent for text-only samples.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from PIL import Image
from torch.utils.data import Dataset

from vtw_train.data.records import IMAGE_PLACEHOLDER, ROLE_MAP, Turn, VQARecord

log = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """A sample cannot be used; the message starts with ``file:line``."""

    def __init__(self, source: str, reason: str, kind: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source, self.reason, self.kind = source, reason, kind


def _iter_raw(path: Path) -> Iterator[tuple[str, object]]:
    """(source, parsed-or-exception) pairs; JSONL by line, a JSON list by item."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{e.lineno}", f"invalid JSON ({e.msg})", "json") from e
        if not isinstance(data, list):
            raise DataFormatError(f"{path}:1", "a .json dataset must be a list of records", "json")
        for i, item in enumerate(data):
            yield f"{path}[item {i}]", item
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", DataFormatError(f"{path}:{lineno}", f"invalid JSON ({e.msg})", "json")


def parse_record(raw: object, source: str, image_root: Path, check_images: bool = True) -> VQARecord:
    """Validate one raw record and turn it into a :class:`VQARecord` (raises DataFormatError)."""
    if isinstance(raw, DataFormatError):
        raise raw
    if not isinstance(raw, dict):
        raise DataFormatError(source, f"record must be an object, got {type(raw).__name__}", "json")
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataFormatError(source, "empty or missing 'conversations'", "empty")
    turns = []
    for j, c in enumerate(convs):
        if not isinstance(c, dict) or c.get("from") not in ROLE_MAP or not isinstance(c.get("value"), str):
            raise DataFormatError(
                source, f"conversation turn {j} needs 'from' (human/gpt) and 'value'", "turn"
            )
        turns.append(Turn(ROLE_MAP[c["from"]], c["value"]))
    if turns[0].role != "user" or not any(t.role == "assistant" for t in turns):
        raise DataFormatError(
            source, "conversation must start with a human turn and contain a gpt turn", "turn"
        )
    if any(t.role == "assistant" and not t.text.strip() for t in turns):
        raise DataFormatError(source, "empty gpt answer", "empty")

    img_field = raw.get("image")
    names = [] if img_field is None else ([img_field] if isinstance(img_field, str) else img_field)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataFormatError(source, "'image' must be a path or a list of paths", "image")
    n_placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if n_placeholders != len(names):
        raise DataFormatError(
            source,
            f"{n_placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) but {len(names)} image(s)",
            "mismatch",
        )
    if any(IMAGE_PLACEHOLDER in t.text for t in turns if t.role == "assistant"):
        raise DataFormatError(source, f"'{IMAGE_PLACEHOLDER}' in a gpt turn", "mismatch")
    paths = [(image_root / n) for n in names]
    if check_images:
        for p in paths:
            if not p.is_file():
                raise DataFormatError(source, f"image not found: {p}", "image")
            try:
                with Image.open(p) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types for corrupt files
                raise DataFormatError(source, f"unreadable image {p}: {e}", "image") from e
    return VQARecord(
        id=str(raw.get("id", source)),
        images=list(paths),
        turns=turns,
        question_type=raw.get("question_type"),
        source=source,
        extra={k: v for k, v in raw.items() if k not in ("id", "image", "conversations", "question_type")},
    )


class LlavaJsonDataset(Dataset):
    """Map-style dataset of :class:`VQARecord` read eagerly from a LLaVA JSON/JSONL file.

    ``image_root`` defaults to the file's directory. Validation happens at construction, so
    a bad file fails before training starts, not hours in.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        check_images: bool = True,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"dataset file not found: {self.path}")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.records: list[VQARecord] = []
        #: Skipped samples per error kind ("json", "empty", "turn", "image", "mismatch").
        self.skipped: Counter[str] = Counter()
        #: (source, reason) of every skipped sample.
        self.errors: list[tuple[str, str]] = []
        for source, raw in _iter_raw(self.path):
            try:
                self.records.append(parse_record(raw, source, self.image_root, check_images))
            except DataFormatError as e:
                if on_error == "raise":
                    raise
                self.skipped[e.kind] += 1
                self.errors.append((e.source, e.reason))
        if self.errors:
            log.warning(
                "%s: skipped %d sample(s) (%s); first: %s",
                self.path,
                len(self.errors),
                dict(self.skipped),
                "{}: {}".format(*self.errors[0]),
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> VQARecord:
        return self.records[i]

    @property
    def num_skipped(self) -> int:
        return len(self.errors)
