"""The LightningDataModule wires reader and collator together."""

from __future__ import annotations

from vtw_train.data import IGNORE_INDEX, VLMDataModule
from vtw_train.data.synthetic import generate_dataset
from vtw_train.toy.build import build_processor


def test_datamodule_loaders(tmp_path):
    train = generate_dataset(tmp_path / "train", 10, seed=1)
    val = generate_dataset(tmp_path / "val", 6, seed=2)
    dm = VLMDataModule(train, val, processor=build_processor(), batch_size=4)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape[0] == 4 and (b["labels"] != IGNORE_INDEX).any()
    v = next(iter(dm.val_dataloader()))
    assert "labels" in v
    g = next(iter(dm.generate_dataloader()))
    assert (g["attention_mask"][:, -1] == 1).all() and len(g["answers"]) == 4
    # Shuffling is seeded: the same seed gives the same first batch.
    dm2 = VLMDataModule(train, val, processor=build_processor(), batch_size=4)
    dm2.setup("fit")
    assert next(iter(dm2.train_dataloader()))["input_ids"].equal(b["input_ids"])


def test_datamodule_processor_from_directory(tmp_path):
    build_processor().save_pretrained(tmp_path / "proc")
    val = generate_dataset(tmp_path / "val", 2, seed=2)
    dm = VLMDataModule(None, val, processor=tmp_path / "proc", batch_size=2)
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))["pixel_values"].shape[0] == 2
