"""A progress bar that counts steps when a run is step-bounded.

Lightning's rich bar labels training "Epoch 0/{max_epochs - 1}", which reads "Epoch 0/-2" for a run
bounded by ``max_steps`` (``max_epochs = -1``). The main job is bounded by steps, so its bar says so.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar


class StepRichProgressBar(RichProgressBar):
    """The rich bar, with "step s/max_steps" instead of a negative epoch count on step-bounded runs."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self._trainer
        if (
            trainer is not None
            and trainer.max_steps is not None
            and trainer.max_steps > 0
            and (trainer.max_epochs in (None, -1))
        ):
            return f"training from step {trainer.global_step} of {trainer.max_steps}"
        return super()._get_train_description(current_epoch)


def label_steps(trainer: Any) -> None:
    """Give the trainer's default rich progress bar the step-bounded label (other bars are left alone)."""
    bar = trainer.progress_bar_callback
    if type(bar) is RichProgressBar:
        bar.__class__ = StepRichProgressBar
