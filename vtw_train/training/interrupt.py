"""Ctrl-C and SIGTERM end training at a step boundary with a resumable checkpoint, and say how to resume.

Why: the first periodic checkpoint may be hundreds of steps away, and a killed job (a pre-empted
cluster slot, a Ctrl-C) would lose everything before it. Lightning already turns SIGTERM into a
stop after the current step (``trainer.received_sigterm``); the first Ctrl-C is made to do the
same, and a second one stops at once. On that stop, :class:`SaveOnInterrupt` writes
``interrupted.ckpt`` next to the periodic checkpoints; the training command then prints the
command that resumes it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

INTERRUPTED = "interrupted.ckpt"


class SaveOnInterrupt(L.Callback):
    """Stop at the next step boundary on SIGINT/SIGTERM and save a checkpoint there."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None
        self._previous_sigint: Any = None

    @property
    def path(self) -> Path:
        return self.dirpath / INTERRUPTED

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.saved = None
        current = signal.getsignal(signal.SIGINT)
        # Lightning restores the handlers it found when fit started, which may be one of ours from an
        # earlier fit in this process: that one counts as the default.
        if current is signal.default_int_handler or getattr(current, "_vtw_interrupt", False):
            try:
                signal.signal(signal.SIGINT, self._stop_after_this_step(trainer))
                self._previous_sigint = signal.default_int_handler
            except ValueError:  # not the main thread: Ctrl-C keeps Lightning's own handling
                self._previous_sigint = None

    def _stop_after_this_step(self, trainer: L.Trainer):
        def handler(signum: int, frame: Any) -> None:
            if trainer.received_sigterm:  # second Ctrl-C: stop now
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            # Lightning's own SIGTERM handling: flag the trainer (and DDP workers), stop after this step.
            os.kill(os.getpid(), signal.SIGTERM)
            print(
                "\ninterrupt: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once, unsaved)",
                file=sys.stderr,
                flush=True,
            )

        handler._vtw_interrupt = True  # type: ignore[attr-defined]
        return handler

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            self.dirpath.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(self.path)
            self.saved = self.path
            rank_zero_info(f"saved a resumable checkpoint at step {trainer.global_step}: {self.path}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
