"""LightningDataModule around the LLaVA reader and the processor-based collator."""

from __future__ import annotations

import os
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from vtw_train.data.collate import VLMCollator
from vtw_train.data.llava_format import LlavaJsonDataset


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
        batch_size: int = 16,
        num_workers: int = 0,
        on_error: Literal["raise", "skip"] = "raise",
        image_root: str | os.PathLike | None = None,
        max_length: int | None = None,
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
        self.batch_size, self.num_workers = batch_size, num_workers
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
        return self._loader(self.train_set, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "train", shuffle=False)

    def generate_dataloader(self, split: Literal["train", "val"] = "val") -> DataLoader:
        """Left-padded prompts with ``answers``/``question_types`` for greedy evaluation."""
        self.setup()
        return self._loader(self.val_set if split == "val" else self.train_set, "generate", shuffle=False)
