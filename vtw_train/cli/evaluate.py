"""``vtw-train evaluate --config cfg.yaml`` (or ``scripts/evaluate.py``): every reduction method side by side.

1. load the model (and, optionally, a gated checkpoint's adapters and exit gate);
2. read the evaluation records (writing synthetic ones on first use) and a disjoint calibration set;
3. calibrate VTW's K and ShortV's layer contribution where the sweep needs them;
4. run every strategy with greedy decoding; time all prefills interleaved on one fixed batch;
5. write results.json, results.csv, predictions.jsonl, summary.md and accuracy_vs_flops.png to
   ``output_dir``, log the table and the plot to W&B when enabled, and print the summary and the
   verdict at the FLOPs budget.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import parse_config
from ..data.llava_format import LlavaJsonDataset
from ..data.records import VQARecord
from ..evaluation import (
    CalibrationSettings,
    GenerationSettings,
    HarnessResult,
    StrategySweep,
    TimingSettings,
    accuracy_vs_flops,
    budget_sentence,
    budget_verdict,
    run_harness,
    strategy_table,
    summary_markdown,
    write_reports,
)
from ..evaluation.report import PER_TYPE_COLUMNS, STRATEGY_TABLE_COLUMNS, per_type_table
from ..models import ModelSpec, load_model


@dataclass
class SyntheticEvalData:
    """Write synthetic VQA records to ``data.path`` / ``data.calibration_path`` when those files are missing.

    The seeds differ from the toy model's training (0) and monitoring (12345) seeds and from the
    gate's training/validation seeds (101/202), so no evaluated sample was seen in training.
    """

    eval_samples: int = 0
    """Evaluation records to write (0: write nothing)."""
    eval_seed: int = 303
    """Seed of the evaluation records."""
    calibration_samples: int = 0
    """Calibration records to write to ``data.calibration_path`` (0: write nothing)."""
    calibration_seed: int = 404
    """Seed of the calibration records."""


@dataclass
class EvalData:
    """Evaluation and calibration records (LLaVA JSON/JSONL)."""

    path: str = "outputs/data/evaluate/eval.jsonl"
    """Records to evaluate."""
    image_root: str | None = None
    """Folder that image paths in the records are relative to (default: the records' folder)."""
    num_samples: int = 0
    """Records evaluated, the first ones of ``path`` (0: all)."""
    calibration_path: str | None = None
    """Records for calibration; when unset (or the same file), the records after the evaluated ones
    in ``path`` are used, so calibration never sees an evaluated sample."""
    on_error: Literal["raise", "skip"] = "raise"
    """A malformed record or a missing image: stop naming it (``raise``), or skip it and count it (``skip``)."""
    synthetic: SyntheticEvalData = field(default_factory=SyntheticEvalData)
    """Synthetic records written on first use."""


@dataclass
class EvaluateRun:
    """The whole evaluation run."""

    model: ModelSpec = field(default_factory=lambda: ModelSpec(path="toy"))
    """The base model."""
    gated_checkpoint: str | None = None
    """A directory exported by `vtw-train train`; needed by the gate strategies, which run with its LoRA
    adapters on (every other strategy runs on the base model)."""
    data: EvalData = field(default_factory=EvalData)
    """Evaluation and calibration records."""
    strategies: StrategySweep = field(default_factory=StrategySweep)
    """The strategies to compare (the full model always runs)."""
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    """Calibration of VTW's K and ShortV's Layer Contribution."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Greedy decoding of the answers."""
    timing: TimingSettings = field(default_factory=TimingSettings)
    """Interleaved prefill timing."""
    budget: float = 0.5
    """The FLOPs ratio at which the verdict names the best strategy."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` picks CUDA when available."""
    threads: int = 0
    """torch intra-op threads (0: torch's default). On small models and shared CPUs one thread is
    often several times faster than two."""
    output_dir: str = "outputs/evaluate"
    """Where results.json, results.csv, predictions.jsonl, summary.md and the plot are written."""
    wandb: bool = True
    """Log the tables and the plot to W&B (WANDB_MODE wins)."""
    wandb_project: str = "vtw-train"
    """W&B project."""
    run_name: str | None = None
    """W&B run name."""

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be a FLOPs ratio in (0, 1], got {self.budget}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.data.num_samples < 0:
            raise ValueError(f"data.num_samples must be >= 0, got {self.data.num_samples}")


def ensure_synthetic_data(data: EvalData) -> None:
    """Write the synthetic evaluation / calibration files that are missing (and asked for)."""
    from ..data.synthetic import ensure_dataset

    synthetic = data.synthetic
    if synthetic.calibration_samples and data.calibration_path is None:
        raise ValueError(
            "data.synthetic.calibration_samples needs data.calibration_path (where to write them)"
        )
    jobs = [(data.path, synthetic.eval_samples, synthetic.eval_seed)]
    if data.calibration_path is not None:
        jobs.append((data.calibration_path, synthetic.calibration_samples, synthetic.calibration_seed))
    for path, n, seed in jobs:
        if n:
            ensure_dataset(path, n, seed)


def load_records(data: EvalData, calibration_needed: int) -> tuple[list[VQARecord], list[VQARecord]]:
    """``(evaluated, calibration)`` records, disjoint by construction."""
    dataset = _read(data.path, data)
    records = list(dataset.records)
    n = data.num_samples or len(records)
    if n > len(records):
        raise ValueError(f"data.num_samples = {n} but {data.path} holds {len(records)} records")
    evaluated = records[:n]
    same_file = (
        data.calibration_path is None or Path(data.calibration_path).resolve() == Path(data.path).resolve()
    )
    if same_file:
        calibration = records[n : n + calibration_needed]
        if len(calibration) < calibration_needed:
            where = "is unset" if data.calibration_path is None else "is data.path"
            evaluated_text = "all of them" if not data.num_samples else f"the first {n}"
            raise ValueError(
                f"calibration needs {calibration_needed} records that are not evaluated (calibration.num_samples "
                f"/ calibration.shortv_samples), but data.calibration_path {where}, so they come from {data.path} "
                f"after the evaluated ones, and data.num_samples = {data.num_samples} evaluates {evaluated_text} "
                f"of its {len(records)} records, leaving {len(records) - n}. Point data.calibration_path at "
                "another file, lower data.num_samples, or calibrate less (calibration.record: an existing record)."
            )
    else:
        calibration = list(_read(data.calibration_path, data).records)
        overlap = {r.id for r in evaluated} & {r.id for r in calibration}
        if overlap:
            raise ValueError(
                f"data.calibration_path shares {len(overlap)} record ids with data.path (e.g. {sorted(overlap)[0]!r}); "
                "calibration must use samples that are not evaluated"
            )
        if len(calibration) < calibration_needed:
            raise ValueError(
                f"data.calibration_path {data.calibration_path} holds {len(calibration)} records, but calibration "
                f"needs {calibration_needed} (calibration.num_samples / calibration.shortv_samples); add records "
                "or lower those settings."
            )
    return evaluated, calibration[:calibration_needed]


def _read(path: str, data: EvalData) -> LlavaJsonDataset:
    dataset = LlavaJsonDataset(path, image_root=data.image_root, on_error=data.on_error)
    if dataset.num_skipped:
        print(f"{path}: skipped {dataset.num_skipped} unreadable records ({dict(dataset.skipped)})")
    return dataset


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was requested but no CUDA device is available")
    return torch.device(name)


def _load(run: EvaluateRun, device: torch.device) -> tuple[Any, Any, Any]:
    """``(model, processor, gate)``; with a gated checkpoint the model is its peft model."""
    if run.model.path is None:
        raise ValueError(
            "model.path is required: the harness decodes text, so it needs a model with a processor"
        )
    torch.manual_seed(run.model.seed)
    model, processor = load_model(run.model)
    gate = None
    if run.gated_checkpoint:
        from ..checkpoint import GatedVLM

        vlm = GatedVLM.from_pretrained(run.gated_checkpoint, base_model=model)
        model, gate = vlm.model, vlm.gate
        if gate is None and run.strategies.needs_gate:
            raise ValueError(
                f"gated_checkpoint {run.gated_checkpoint} has no exit gate; remove the gate strategies"
            )
    elif run.strategies.needs_gate:
        key = "strategies.gate" if run.strategies.gate else "strategies.vispruner_gate"
        raise ValueError(
            f"{key} needs a learned gate: set gated_checkpoint to a checkpoint exported by `vtw-train train`"
        )
    model.to(device).eval()
    if gate is not None:
        gate.to(device).eval()
    return model, processor, gate


def _calibration_needed(run: EvaluateRun) -> int:
    cal = run.calibration
    needs_k = (run.strategies.vtw_calibrated and not cal.record) or run.strategies.vtw_answer_calibrated
    n = cal.num_samples if needs_k else 0
    if run.strategies.needs_shortv:
        n = max(n, cal.shortv_samples)
    return n


def log_to_wandb(run: EvaluateRun, result: HarnessResult, plot: Path, out_dir: Path) -> None:
    """The strategy table, the per-type table, the plot and the verdict, when W&B is not disabled."""
    from ..training.wandb import resolve_wandb_mode

    mode = resolve_wandb_mode()
    if not run.wandb or mode == "disabled":
        return
    import wandb

    session = wandb.init(
        project=run.wandb_project,
        name=run.run_name,
        dir=str(out_dir),
        mode=mode,
        config=dataclasses.asdict(run),
        job_type="evaluate",
    )
    try:
        session.log(
            {
                "evaluate/strategies": wandb.Table(
                    columns=list(STRATEGY_TABLE_COLUMNS), data=strategy_table(result)
                ),
                "evaluate/per_question_type": wandb.Table(
                    columns=list(PER_TYPE_COLUMNS), data=per_type_table(result)
                ),
                "evaluate/accuracy_vs_flops": wandb.Image(str(plot)),
            }
        )
        session.summary["evaluate/verdict"] = budget_sentence(budget_verdict(result, run.budget))
    finally:
        session.finish()


def main(argv: Sequence[str] | None = None) -> HarnessResult:
    started = time.perf_counter()
    run = parse_config(EvaluateRun, argv, "evaluate.py", __doc__ or "")
    if run.threads:
        torch.set_num_threads(run.threads)
    device = _device(run.device)
    out_dir = Path(run.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_synthetic_data(run.data)
    records, calibration_records = load_records(run.data, _calibration_needed(run))
    model, processor, gate = _load(run, device)
    print(
        f"evaluating on {len(records)} records from {run.data.path} ({device}, "
        f"{torch.get_num_threads()} threads); {len(calibration_records)} calibration records"
    )
    result = run_harness(
        model,
        processor,
        records,
        calibration_records,
        run.strategies,
        generation=run.generation,
        timing=run.timing,
        calibration=run.calibration,
        gate=gate,
        artifacts_dir=out_dir,
    )
    result.meta.update(
        model=run.model.path,
        gated_checkpoint=run.gated_checkpoint,
        data=run.data.path,
        device=str(device),
        threads=torch.get_num_threads(),
        config=dataclasses.asdict(run),
        wall_seconds_before_reports=time.perf_counter() - started,
    )
    paths = write_reports(result, records, out_dir, run.budget)
    paths["plot"] = accuracy_vs_flops(result, out_dir / "accuracy_vs_flops.png", budget=run.budget)
    log_to_wandb(run, result, paths["plot"], out_dir)
    print(summary_markdown(result, run.budget))
    print("outputs: " + ", ".join(str(p) for p in paths.values()))
    print(f"wall time {time.perf_counter() - started:.0f} s")
    print(budget_sentence(budget_verdict(result, run.budget)))
    return result
