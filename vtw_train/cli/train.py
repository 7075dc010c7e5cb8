"""``vtw-train train --config cfg.yaml`` (or ``scripts/train_gate.py``): the main job.

1. calibrate the fixed exit layer K on the base model (unless a calibration record is given);
2. train the LoRA adapters and the exit gate (LightningCLI: model, data and trainer sections);
3. evaluate the full model, fixed-K VTW and the gate side by side (exact match, FLOPs);
4. export a gated checkpoint (adapters + gate + calibration + manifest).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LightningCLI

from ..adapters import adapters_enabled
from ..calibration import CalibrationConfig, CalibrationRecord, calibrate, calibration_batches
from ..data.datamodule import VLMDataModule
from ..evaluation.policies import compare_policies, format_results, gate_verdicts
from ..models import resolve_model_path
from ..training.module import GateDistillModule
from ..training.wandb import make_wandb_logger


@dataclass
class SyntheticData:
    """Write the embedded synthetic VQA set to ``data.train_path`` / ``data.val_path`` when missing.

    The seeds differ from the ones the toy model was trained and evaluated on, so the gate is
    trained and judged on samples the base model has never seen.
    """

    train_samples: int = 0
    """Training samples to write (0: write nothing, use the file as it is)."""
    val_samples: int = 0
    """Validation samples to write (0: write nothing)."""
    train_seed: int = 101
    """Seed of the training samples."""
    val_seed: int = 202
    """Seed of the validation samples."""


@dataclass
class RunOptions:
    """What happens around ``fit``: calibration, evaluation, export, logging."""

    output_dir: str = "outputs/run"
    """Folder of the run: calibration record, evaluation.json, the gated checkpoint, logs."""
    calibration: str | None = None
    """An existing calibration record (JSON) to use instead of calibrating."""
    calibration_metric: Literal["first_token", "answer_mean"] = "answer_mean"
    """KL criterion: at the first answer token (VTW's) or averaged over the answer tokens."""
    calibration_threshold: float = 0.01
    """eta: K is the first candidate whose mean KL is at most this."""
    calibration_samples: int = 20
    """Training samples the calibration averages over."""
    eval_samples: int = 200
    """Validation records used for the exact-match comparison (0 skips it)."""
    eval_batch_size: int = 32
    """Prompts per generate call in the comparison."""
    eval_taus: list[float] = field(default_factory=list)
    """Gate thresholds to evaluate (empty: the module's gate_tau)."""
    export: bool = True
    """Write the gated checkpoint to ``<output_dir>/gated``."""
    wandb: bool = True
    """Log to Weights & Biases (online with an API key, else offline; WANDB_MODE wins)."""
    wandb_project: str = "vtw-train"
    """W&B project."""
    run_name: str | None = None
    """W&B run name."""
    resume: str | None = None
    """A Lightning checkpoint to resume training from."""
    threads: int = 0
    """CPU threads for torch (0: torch's default); 1 avoids oversubscription on a shared machine."""
    synthetic: SyntheticData = field(default_factory=SyntheticData)
    """Synthetic data written on first use."""


def ensure_synthetic_data(datamodule: VLMDataModule, synthetic: SyntheticData) -> None:
    from ..data.synthetic import ensure_dataset

    for path, n, seed in (
        (datamodule.train_path, synthetic.train_samples, synthetic.train_seed),
        (datamodule.val_path, synthetic.val_samples, synthetic.val_seed),
    ):
        if n and path is not None:
            ensure_dataset(path, n, seed)


def processor_dir(model_path: str) -> str:
    return str(resolve_model_path(model_path))


class GateCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(RunOptions, "run")
        parser.link_arguments("model.model_path", "data.processor", compute_fn=processor_dir)
        # Lightning writes config.yaml, logs and checkpoints under default_root_dir: keep them in the run's folder.
        parser.link_arguments("run.output_dir", "trainer.default_root_dir")


def calibrate_base(
    module: GateDistillModule, datamodule: VLMDataModule, options: RunOptions
) -> CalibrationRecord:
    """K for the base model (adapters off), as training-free VTW would use it, on training samples:
    K is chosen on data the comparison is not scored on."""
    from tqdm.auto import tqdm

    datamodule.setup("fit")
    source = datamodule.train_set if datamodule.train_set is not None else datamodule.val_set
    records = [source[i] for i in range(min(options.calibration_samples, len(source)))]
    batches = calibration_batches(datamodule.processor, records, datamodule.batch_size)
    config = CalibrationConfig(
        threshold=options.calibration_threshold,
        num_samples=options.calibration_samples,
        metric=options.calibration_metric,
    )
    total = -(-options.calibration_samples // datamodule.batch_size)
    with adapters_enabled(module.model, False):
        return calibrate(module.model, tqdm(batches, total=total, desc="calibration", unit="batch"), config)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cli = GateCLI(
        GateDistillModule,
        VLMDataModule,
        run=False,
        args=None if argv is None else list(argv),
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )
    options: RunOptions = cli.config_init["run"]
    if isinstance(options, dict):
        options = RunOptions(**options)
    if options.threads:
        torch.set_num_threads(options.threads)
    module: GateDistillModule = cli.model
    datamodule: VLMDataModule = cli.datamodule
    trainer = cli.trainer
    out_dir = Path(options.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = make_wandb_logger(options.wandb_project, options.run_name, out_dir) if options.wandb else None
    if logger is not None:
        trainer.loggers = [logger]
        logger.log_hyperparams(cli.config.as_dict())

    ensure_synthetic_data(datamodule, options.synthetic)
    module.configure_model()
    if options.calibration:
        record = CalibrationRecord.load(options.calibration, model=module.model)
    else:
        print(f"calibrating the fixed exit layer on {options.calibration_samples} training samples ...")
        record = calibrate_base(module, datamodule, options)
    record.save(out_dir / "vtw_calibration.json")
    print(
        f"calibrated K = {record.exit_layer} (KL curve: "
        + ", ".join(f"{k}:{v:.4f}" for k, v in sorted(record.kl_curve.items()))
        + ")"
    )
    if logger is not None:
        _log_calibration(logger, record)

    trainer.fit(module, datamodule=datamodule, ckpt_path=options.resume)

    summary: dict[str, Any] = {"calibrated_exit_layer": record.exit_layer}
    if not trainer.is_global_zero:
        return summary
    if options.eval_samples > 0:
        datamodule.setup("validate")
        records = [datamodule.val_set[i] for i in range(min(options.eval_samples, len(datamodule.val_set)))]
        print(f"evaluating full model, fixed-K VTW and the gate on {len(records)} validation samples ...")
        results = compare_policies(
            module.model,
            datamodule.processor,
            records,
            module.gate,
            record.exit_layer,
            taus=options.eval_taus,
            batch_size=options.eval_batch_size,
        )
        table = format_results(results)
        print(table)
        verdicts = gate_verdicts(results)
        for v in verdicts:
            print(v.line())
        summary["results"] = [{k: v for k, v in asdict(r).items() if k != "predictions"} for r in results]
        summary["gate_verdicts"] = [asdict(v) for v in verdicts]
        (out_dir / "evaluation.json").write_text(json.dumps(summary, indent=2) + "\n")
        if logger is not None:
            _log_results(logger, results, records)
    if options.export:
        from ..checkpoint import export_gated_checkpoint

        path = export_gated_checkpoint(
            out_dir / "gated",
            module.model,
            module.gate,
            record,
            base_model_name_or_path=module.hparams.model_path,
            policy=module.hparams.policy,
            overwrite=True,
        )
        summary["checkpoint"] = str(path)
        print(f"gated checkpoint written to {path}")
    return summary


def _log_calibration(logger: Any, record: CalibrationRecord) -> None:
    import wandb

    data = [[k, v] for k, v in sorted(record.kl_curve.items())]
    table = wandb.Table(data=data, columns=["exit_layer", "mean_kl"])
    logger.experiment.log(
        {
            "calibration/kl_curve": wandb.plot.line(
                table, "exit_layer", "mean_kl", title="KL(P_K || P_full) by exit layer"
            ),
            "calibration/exit_layer": record.exit_layer,
        }
    )


def _log_results(logger: Any, results, records) -> None:
    import wandb

    rows = [[r.name, r.accuracy, r.flops_ratio, r.mean_exit_layer] for r in results]
    logger.experiment.log(
        {
            "eval/policies": wandb.Table(
                data=rows, columns=["policy", "accuracy", "flops_ratio", "mean_exit_layer"]
            )
        }
    )
    gate = [r for r in results if r.name.startswith("gate")]
    if gate:
        hist = [[k] * n for k, n in gate[0].exit_histogram.items()]
        logger.experiment.log({"eval/gate_exit_layers": wandb.Histogram([k for h in hist for k in h])})
    full = results[0]
    sample_rows = []
    for i, record in enumerate(records[:20]):
        sample_rows.append(
            [
                record.id,
                record.turns[0].text if record.turns else "",
                record.answer,
                full.predictions[i],
                *(r.predictions[i] for r in results[1:]),
            ]
        )
    columns = ["id", "question", "answer", full.name, *(r.name for r in results[1:])]
    logger.experiment.log({"eval/sample_answers": wandb.Table(data=sample_rows, columns=columns)})
