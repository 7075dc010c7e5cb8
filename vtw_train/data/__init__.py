"""Data layer: LLaVA-format reading, processor-based collation, synthetic VQA, the answer convention.

Public API::

    LlavaJsonDataset(path, image_root=None, on_error="raise" | "skip")  -> VQARecord items
    VLMCollator(processor, mode="train" | "generate", max_length=None)
    VLMDataModule(train_path, val_path, processor, batch_size, num_workers, on_error)
    answer_normalize(text) / is_match(prediction, answer)
    synthetic.generate_dataset(out_dir, n, seed)  -> data.jsonl + images/*.png

The Lightning data module is imported lazily so that readers and collators work
without importing Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vtw_train.data import synthetic
from vtw_train.data.answers import answer_normalize, is_match
from vtw_train.data.collate import (
    IGNORE_INDEX,
    ImageTokenMismatchError,
    VLMCollator,
    collated_batches,
    model_inputs,
)
from vtw_train.data.llava_format import DataFormatError, LlavaJsonDataset, parse_record
from vtw_train.data.records import Turn, VQARecord, from_conversation, from_sample, load_image
from vtw_train.data.synthetic import generate_dataset

if TYPE_CHECKING:
    from vtw_train.data.datamodule import VLMDataModule


def __getattr__(name: str):
    if name == "VLMDataModule":
        from vtw_train.data.datamodule import VLMDataModule

        return VLMDataModule
    raise AttributeError(name)


__all__ = [
    "IGNORE_INDEX",
    "DataFormatError",
    "ImageTokenMismatchError",
    "LlavaJsonDataset",
    "Turn",
    "VLMCollator",
    "collated_batches",
    "model_inputs",
    "VLMDataModule",
    "VQARecord",
    "answer_normalize",
    "from_conversation",
    "from_sample",
    "generate_dataset",
    "is_match",
    "load_image",
    "parse_record",
    "synthetic",
]
