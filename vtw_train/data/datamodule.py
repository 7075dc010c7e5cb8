"""LightningDataModule around the LLaVA reader and the processor-based collator."""

from __future__ import annotations

import os
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from vtw_train.config import NonNegativeInt, PositiveInt
from vtw_train.data.collate import VLMCollator
from vtw_train.data.llava_format import LlavaJsonDataset
from vtw_train.data.resumable import ResumableDataLoader, ResumableSampler


class VLMDataModule(L.LightningDataModule):
    """Train/val loaders from LLaVA JSON(L) files, collated by the model's processor.

    ``processor`` is a processor object or a directory for ``AutoProcessor``. Validation uses
    train-mode collation (loss on answers); :meth:`generate_dataloader` gives left-padded
    prompts for exact-match evaluation.
    """

    def __init__(
        self,
        train_path: str | os.PathLike | None,
        val_path: str | os.PathLike | None = None,
        processor: Any = None,
        batch_size: PositiveInt = 16,
        num_workers: NonNegativeInt = 0,
        on_error: Literal["raise", "skip"] = "raise",
        image_root: str | os.PathLike | None = None,
        max_length: PositiveInt | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if processor is None:
            raise ValueError("VLMDataModule needs a processor (object or directory)")
        if isinstance(processor, (str, os.PathLike)):
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(processor)
        self.processor = processor
        self.train_path, self.val_path = train_path, val_path
        if batch_size < 1 or num_workers < 0 or (max_length is not None and max_length < 1):
            raise ValueError(
                f"data.batch_size must be >= 1, data.num_workers >= 0 and data.max_length >= 1; got "
                f"{batch_size}, {num_workers} and {max_length}."
            )
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.on_error, self.image_root, self.max_length, self.seed = on_error, image_root, max_length, seed
        self.train_set: LlavaJsonDataset | None = None
        self.val_set: LlavaJsonDataset | None = None

    def _load(self, path) -> LlavaJsonDataset | None:
        if path is None:
            return None
        return LlavaJsonDataset(path, image_root=self.image_root, on_error=self.on_error)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._load(self.train_path)
        if self.val_set is None:
            self.val_set = self._load(self.val_path)

    def _loader(self, ds, mode: str, shuffle: bool) -> DataLoader:
        if ds is None:
            raise RuntimeError("no dataset for this split (path was None, or setup() not called)")
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=g if shuffle else None,
            num_workers=self.num_workers,
            collate_fn=VLMCollator(self.processor, mode=mode, max_length=self.max_length),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled with ``seed``; its position is saved in checkpoints, so a resumed run continues the stream."""
        if self.train_set is None:
            raise RuntimeError("no dataset for this split (path was None, or setup() not called)")
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=ResumableSampler(len(self.train_set), seed=self.seed, shuffle=True),
            num_workers=self.num_workers,
            collate_fn=VLMCollator(self.processor, mode="train", max_length=self.max_length),
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "train", shuffle=False)

    def generate_dataloader(self, split: Literal["train", "val"] = "val") -> DataLoader:
        """Left-padded prompts with ``answers``/``question_types`` for greedy evaluation."""
        self.setup()
        return self._loader(self.val_set if split == "val" else self.train_set, "generate", shuffle=False)
