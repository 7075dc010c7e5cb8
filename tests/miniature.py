"""A miniature toy VLM with its processor and a few synthetic VQA samples, saved to disk.

Same code paths as the embedded default (stock LLaVA, word-level tokenizer, LLaVA-format
JSONL), built in seconds so the training tests do not depend on the committed weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from vtw_train.data.collate import VLMCollator, collated_batches
from vtw_train.data.llava_format import LlavaJsonDataset
from vtw_train.data.synthetic import generate_dataset
from vtw_train.toy.build import build_model, build_processor, miniature_arch


def build_miniature(root: Path, text_layers: int = 4, train: int = 24, val: int = 8) -> dict[str, Path]:
    arch = replace(miniature_arch(), text_layers=text_layers)
    processor = build_processor(arch)
    model = build_model(arch, processor.tokenizer, seed=0)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    train_path = generate_dataset(root / "data", train, seed=1, filename="train.jsonl")
    val_path = generate_dataset(root / "data", val, seed=2, filename="val.jsonl")
    return {"model": model_dir, "train": train_path, "val": val_path}


def batches(paths: dict[str, Path], processor, mode: str = "train", size: int = 4, split: str = "val"):
    dataset = LlavaJsonDataset(paths[split])
    collate = VLMCollator(processor, mode=mode)
    return list(collated_batches([dataset[i] for i in range(len(dataset))], collate, size))
