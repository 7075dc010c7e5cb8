"""``vtw-train calibrate --config cfg.yaml`` (or ``scripts/calibrate.py``): pick VTW's K by the KL criterion."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..calibration import CalibrationConfig, CalibrationRecord, calibrate, calibration_batches, kl_per_sample
from ..config import parse_config
from ..engine import attach
from ..models import ModelSpec, load_model
from ..timing import interleaved_medians


@dataclass
class CalibrationData:
    """Calibration samples."""

    source: Literal["random", "llava_json"] = "random"
    """``random`` (random prompts for a tiny random model: a smoke test of the machinery, not a
    meaningful K) or ``llava_json`` (a LLaVA-format JSON/JSONL file read through the model's processor)."""
    path: str | None = None
    """The LLaVA-format file (``llava_json``)."""
    image_root: str | None = None
    """Folder that image paths are relative to (default: the file's folder)."""
    batch_size: int = 4
    """Calibration batch size."""
    seed: int = 0
    """Seed of the random prompts."""


@dataclass
class CalibrateRun:
    """One calibration: model, data, criterion, and where the record goes."""

    model: ModelSpec = field(default_factory=lambda: ModelSpec(tiny_family="llava"))
    """The model to calibrate."""
    data: CalibrationData = field(default_factory=CalibrationData)
    """Calibration samples."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    """The KL criterion."""
    output: str = "outputs/calibration/vtw_calibration.json"
    """Where the record is written."""
    benchmark_repeats: int = 5
    """Interleaved rounds timing the all-K sweep against one plain forward."""


def sample_batches(
    data: CalibrationData, model: Any, processor: Any, num_samples: int, metric: str
) -> Iterator[dict[str, torch.Tensor]]:
    if data.source == "random":
        from ..tiny_models import tiny_inputs

        for i in range(math.ceil(num_samples / data.batch_size)):
            size = min(data.batch_size, num_samples - i * data.batch_size)
            yield tiny_inputs(model, batch_size=size, seed=data.seed + i)
        return
    if data.path is None:
        raise ValueError("data.path is required when data.source is 'llava_json'.")
    if processor is None:
        raise ValueError(
            "data.source 'llava_json' needs a model with a processor (model.path), not a tiny random model."
        )
    from ..data import LlavaJsonDataset

    dataset = LlavaJsonDataset(data.path, image_root=data.image_root)
    records = [dataset[i] for i in range(min(num_samples, len(dataset)))]
    # answer_mean needs the teacher-forced answers (train collation, labels); first_token needs prompts only.
    mode = "train" if metric == "answer_mean" else "generate"
    yield from calibration_batches(processor, records, data.batch_size, mode=mode)


def measure_cost(
    model: Any, batch: dict[str, torch.Tensor], candidates: list[int], metric: str, repeats: int
) -> dict[str, float]:
    """Seconds of the all-K sweep and of one plain forward on the same batch, interleaved."""
    plain = {k: v for k, v in batch.items() if k != "labels"}

    def forward() -> None:
        with torch.no_grad():
            model(**plain, use_cache=False)

    def sweep() -> None:
        kl_per_sample(model, batch, candidates, metric)

    return interleaved_medians({"forward": forward, "sweep": sweep}, repeats=repeats)


def format_curve(record: CalibrationRecord) -> str:
    lines = ["  K   mean KL     <= eta"]
    for k, kl in sorted(record.kl_curve.items()):
        mark = "yes" if kl <= record.threshold else "no"
        chosen = "  <- K" if k == record.exit_layer else ""
        lines.append(f"{k:3d}   {kl:9.5f}   {mark}{chosen}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> CalibrationRecord:
    run = parse_config(CalibrateRun, argv, "calibrate.py", __doc__ or "")
    torch.manual_seed(run.model.seed)
    model, processor = load_model(run.model)
    controller = attach(model)
    cfg = run.calibration
    batches = list(sample_batches(run.data, model, processor, cfg.num_samples, cfg.metric))
    record = calibrate(model, batches, cfg)
    path = record.save(run.output)
    candidates = record.candidate_layers
    times = measure_cost(model, batches[0], candidates, cfg.metric, run.benchmark_repeats)
    ratio = times["sweep"] / times["forward"]
    print(
        f"model: {type(model).__name__}, {controller.num_layers} decoder layers; {record.num_samples} samples"
    )
    print(f"KL(P_K || P_full) at {cfg.metric}, threshold eta = {cfg.threshold}:")
    print(format_curve(record))
    print(f"calibrated exit layer K = {record.exit_layer} of {controller.num_layers}")
    print(
        f"cost: all {len(candidates)} candidate K in one shared-prefix pass = {ratio:.2f}x one plain forward "
        f"(medians of {run.benchmark_repeats} interleaved runs: {times['sweep'] * 1e3:.1f} ms vs "
        f"{times['forward'] * 1e3:.1f} ms per batch of {batches[0]['input_ids'].shape[0]})"
    )
    print(f"record written to {path}")
    return record
