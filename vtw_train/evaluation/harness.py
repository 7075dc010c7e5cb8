"""The harness: every strategy of a sweep on the same records, with comparable numbers.

Order of work: calibrate what needs calibrating (VTW's K, ShortV's Layer Contribution) on
samples that are not evaluated and on the base model; expand the sweep; generate answers per
strategy; time all prefills in one interleaved loop; then score everything against the
reference answers and against the full model's own answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import adapters_enabled, has_adapters, set_adapters
from ..calibration import (
    CalibrationConfig,
    CalibrationRecord,
    ShortVRecord,
    calibrate,
    calibration_batches,
    layer_contribution,
)
from ..data.collate import VLMCollator, model_inputs
from ..data.records import VQARecord
from ..engine import FULL, attach
from ..gate import ExitGate
from .loop import Answers, run_strategy
from .profiling import PrefillCost, measure_prefill
from .results import HarnessResult, StrategyResult, group_stats
from .settings import CalibrationSettings, GenerationSettings, TimingSettings
from .strategies import Strategy, StrategySweep, expand_strategies

Log = Callable[[str], None]


def calibrate_exit_layer(
    model: nn.Module,
    processor: Any,
    records: Sequence[VQARecord],
    settings: CalibrationSettings,
    device: torch.device,
    *,
    answer_variant: bool = False,
) -> CalibrationRecord:
    """K on the base model (adapters off): from ``settings.record``, by VTW's rule (first-token KL,
    ``settings.threshold``), or with ``answer_variant`` by our answer-token mean (``settings.answer_threshold``)."""
    if settings.record and not answer_variant:
        return CalibrationRecord.load(settings.record, model=model)
    _require(records, settings.num_samples, "calibration.num_samples")
    config = CalibrationConfig(
        threshold=settings.answer_threshold if answer_variant else settings.threshold,
        num_samples=settings.num_samples,
        metric="answer_mean" if answer_variant else settings.metric,
        min_layer=settings.min_layer,
    )
    batches = calibration_batches(
        processor, records[: settings.num_samples], settings.batch_size, device=device
    )
    with adapters_enabled(model, False):
        return calibrate(model, batches, config)


def measure_layer_contribution(
    model: nn.Module,
    processor: Any,
    records: Sequence[VQARecord],
    settings: CalibrationSettings,
    device: torch.device,
) -> ShortVRecord:
    """ShortV's Layer Contribution on the base model (adapters off)."""
    _require(records, settings.shortv_samples, "calibration.shortv_samples")
    batches = calibration_batches(
        processor, records[: settings.shortv_samples], settings.batch_size, device=device
    )
    with adapters_enabled(model, False):
        return layer_contribution(model, batches, num_samples=settings.shortv_samples)


def _require(records: Sequence[VQARecord], n: int, key: str) -> None:
    if len(records) < n:
        raise ValueError(
            f"{key} = {n} but only {len(records)} calibration records are available; add records "
            "(data.calibration_path, or data.synthetic.calibration_samples) or lower the setting"
        )


def run_harness(
    model: nn.Module,
    processor: Any,
    records: Sequence[VQARecord],
    calibration_records: Sequence[VQARecord],
    sweep: StrategySweep,
    *,
    generation: GenerationSettings | None = None,
    timing: TimingSettings | None = None,
    calibration: CalibrationSettings | None = None,
    gate: ExitGate | None = None,
    artifacts_dir: str | Path | None = None,
    log: Log = print,
) -> HarnessResult:
    """Evaluate the full model and every strategy of ``sweep`` on ``records``.

    ``model`` is a stock model or a peft model carrying the LoRA adapters of a gated checkpoint
    (``gate`` is then its exit gate): gate strategies run with the adapters on, all others on
    the base model. ``calibration_records`` must not overlap ``records``. When given,
    ``artifacts_dir`` receives ``vtw_calibration.json`` and ``shortv_record.json``.
    """
    generation = generation or GenerationSettings()
    timing = timing or TimingSettings()
    calibration = calibration or CalibrationSettings()
    if not records:
        raise ValueError("no records to evaluate (data.num_samples or the data file is empty)")
    controller = attach(model)
    controller.reduction = FULL
    device = next(model.parameters()).device
    model.eval()

    cal_record = answer_record = shortv_record = None
    for wanted, answer_variant in ((sweep.vtw_calibrated, False), (sweep.vtw_answer_calibrated, True)):
        if not wanted:
            continue
        start = time.perf_counter()
        record = calibrate_exit_layer(
            model, processor, calibration_records, calibration, device, answer_variant=answer_variant
        )
        log(
            f"calibrated K = {record.exit_layer} of {controller.num_layers} ({record.metric} KL <= eta "
            f"{record.threshold:g}, {record.threshold_source or 'set'}; {record.num_samples} samples, "
            f"{time.perf_counter() - start:.1f} s); KL: "
            + ", ".join(f"{k}:{v:.4f}" for k, v in sorted(record.kl_curve.items()))
        )
        if answer_variant:
            answer_record = record
        else:
            cal_record = record
    if sweep.needs_shortv:
        start = time.perf_counter()
        shortv_record = measure_layer_contribution(model, processor, calibration_records, calibration, device)
        log(
            f"ShortV layer contribution ({shortv_record.num_samples} samples, {time.perf_counter() - start:.1f} s): "
            + ", ".join(f"{i}:{v:.4f}" for i, v in enumerate(shortv_record.layer_contribution))
            + f"; freezing order {shortv_record.frozen_order}"
        )
    if artifacts_dir is not None:
        if cal_record is not None:
            cal_record.save(Path(artifacts_dir) / "vtw_calibration.json")
        if shortv_record is not None:
            shortv_record.save(Path(artifacts_dir) / "shortv_record.json")

    strategies = expand_strategies(
        sweep,
        controller.num_layers,
        calibrated_exit_layer=None if cal_record is None else cal_record.exit_layer,
        answer_calibrated_exit_layer=None if answer_record is None else answer_record.exit_layer,
        gate=gate,
        shortv=shortv_record,
        lora=has_adapters(model),
    )
    generated: dict[str, Answers] = {}
    try:
        for i, strategy in enumerate(strategies, 1):
            start = time.perf_counter()
            with tqdm(
                total=len(records), desc=strategy.name, unit="sample", leave=False, dynamic_ncols=True
            ) as bar:
                generated[strategy.name] = run_strategy(
                    model,
                    processor,
                    records,
                    strategy,
                    batch_size=generation.batch_size,
                    max_new_tokens=generation.max_new_tokens,
                    progress=bar.update,
                )
            ratios = generated[strategy.name].flops_ratios
            log(
                f"[{i}/{len(strategies)}] {strategy.name}: FLOPs {sum(ratios) / len(ratios):.3f} "
                f"({time.perf_counter() - start:.1f} s)"
            )
        start = time.perf_counter()
        costs = _measure(model, processor, records, strategies, timing, device)
        log(
            f"prefill timing: {len(strategies)} strategies x {timing.repeats} interleaved rounds on "
            f"{min(timing.batch_size, len(records))} prompts ({time.perf_counter() - start:.1f} s)"
        )
    finally:
        set_adapters(model, True)
        controller.reduction = FULL

    result = _assemble(
        strategies, generated, costs, records, controller.num_layers, timing, cal_record, shortv_record
    )
    full = generated[strategies[0].name]
    result.meta["mean_text_tokens"] = full.mean_text_tokens
    result.meta["mean_visual_tokens"] = sum(full.n_visual) / max(1, len(full.n_visual))
    if answer_record is not None:
        result.meta["answer_calibration"] = _calibration_summary(answer_record)
    return result


def _measure(
    model: nn.Module,
    processor: Any,
    records: Sequence[VQARecord],
    strategies: list[Strategy],
    timing: TimingSettings,
    device: torch.device,
) -> dict[str, PrefillCost]:
    batch = model_inputs(VLMCollator(processor, mode="generate")(list(records[: timing.batch_size])))
    batch = {k: v.to(device) for k, v in batch.items()}
    return measure_prefill(model, strategies, batch, repeats=timing.repeats, warmup=timing.warmup)


def _assemble(
    strategies: list[Strategy],
    generated: dict[str, Answers],
    costs: dict[str, PrefillCost],
    records: Sequence[VQARecord],
    num_layers: int,
    timing: TimingSettings,
    cal_record: CalibrationRecord | None,
    shortv_record: ShortVRecord | None,
) -> HarnessResult:
    answers = [r.answer for r in records]
    qtypes = [r.question_type for r in records]
    reference = generated[strategies[0].name].predictions
    full_cost = costs[strategies[0].name]
    results = []
    for s in strategies:
        g, cost = generated[s.name], costs[s.name]
        overall, per_type = group_stats(g.predictions, reference, answers, qtypes, g.flops_ratios)
        mean_exit = None
        if s.withdraws:
            mean_exit = sum(num_layers if k is None else k for k in g.exit_layers) / len(g.exit_layers)
        results.append(
            StrategyResult(
                name=s.name,
                method=s.method,
                settings=dict(s.settings),
                n=overall.n,
                accuracy=overall.accuracy,
                agreement=overall.agreement,
                flops_ratio=overall.flops_ratio,
                prefill_seconds=cost.seconds,
                time_ratio=cost.seconds / full_cost.seconds,
                kv_bytes=cost.kv_bytes,
                kv_ratio=cost.kv_bytes / full_cost.kv_bytes if full_cost.kv_bytes else float("nan"),
                peak_memory_bytes=cost.peak_memory_bytes,
                mean_exit_layer=mean_exit,
                per_type=per_type,
                predictions=g.predictions,
                mean_visual_in=g.mean_visual_in,
            )
        )
    counts = results[0].per_type
    return HarnessResult(
        strategies=results,
        num_layers=num_layers,
        num_samples=len(records),
        question_types={t: g.n for t, g in counts.items()},
        timing_batch_size=min(timing.batch_size, len(records)),
        calibration=None if cal_record is None else _calibration_summary(cal_record),
        shortv=None if shortv_record is None else asdict(shortv_record),
    )


def _calibration_summary(record: CalibrationRecord) -> dict[str, Any]:
    return {
        "exit_layer": record.exit_layer,
        "threshold": record.threshold,
        "threshold_source": record.threshold_source,
        "metric": record.metric,
        "num_samples": record.num_samples,
        "kl_curve": {str(k): v for k, v in sorted(record.kl_curve.items())},
    }
