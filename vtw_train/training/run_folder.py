"""The main job's output folder: one run per folder, resumed in place, never left with outputs that disagree.

Why: a run writes its calibration record first, its evaluation and gated checkpoint last. If a
rerun into a used folder is killed in between, the folder would hold a new K beside an old
evaluation and checkpoint. So a run starts only in an empty folder, in its own folder when it
resumes, or with ``run.overwrite``, and in the last two cases the outputs a run rewrites are
removed before it writes anything. ``run.json`` records the run's identity (its id, reused by
the loggers on resume, so a resumed run continues the same log) and what it has finished.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..atomic_write import write_text_atomically

RUN_RECORD = "run.json"
CHECKPOINTS = "checkpoints"
#: Outputs a run rewrites; removed before a resumed or overwriting run writes anything.
FINAL_OUTPUTS = ("evaluation.json", "gated")
CALIBRATION = "vtw_calibration.json"


@dataclass
class RunRecord:
    """Identity and progress of the run that owns an output folder."""

    run_id: str
    started: str
    command: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    def save(self, folder: Path) -> None:
        write_text_atomically(folder / RUN_RECORD, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> RunRecord | None:
        path = folder / RUN_RECORD
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path} is not a run record ({err}); choose another run.output_dir.") from None


def prepare_output_folder(
    folder: Path, *, resume: str | None, overwrite: bool, command: list[str]
) -> RunRecord:
    """Check that a run may write to ``folder``, clear what it will rewrite, and return its run record.

    Refuses a folder that holds anything unless the run resumes there (``run.resume``) or
    ``run.overwrite`` is set; names the way out in the error. Creates nothing before the checks pass.
    """
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"run.output_dir {folder} is a file; choose a folder.")
    used = folder.is_dir() and any(folder.iterdir())
    record = RunRecord.load(folder) if used else None
    if used and not (resume or overwrite):
        raise ValueError(
            f"run.output_dir {folder} is not empty (it holds an earlier run's outputs). Choose a new "
            "run.output_dir, resume that run with --run.resume <checkpoint>, or replace it with --run.overwrite true."
        )
    if overwrite and not resume:
        for child in folder.iterdir() if used else []:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        record = None
    elif used:
        for name in FINAL_OUTPUTS:
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    if record is None:
        record = RunRecord(
            run_id=uuid.uuid4().hex[:8],
            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command=command,
        )
    record.finished = [step for step in record.finished if step == "calibration"]
    record.save(folder)
    return record


def mark_finished(folder: Path, record: RunRecord, step: str) -> None:
    """Record that ``step`` (calibration, training, evaluation, export) is done and its outputs are written."""
    if step not in record.finished:
        record.finished.append(step)
    record.save(folder)
