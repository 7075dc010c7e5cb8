"""``vtw-train train --config cfg.yaml`` (or ``scripts/train_gate.py``): the main job.

1. calibrate the fixed exit layer K on the base model (unless a calibration record is given);
2. train the LoRA adapters and the exit gate (LightningCLI: model, data and trainer sections);
3. evaluate the full model, fixed-K VTW and the gate side by side (exact match, FLOPs);
4. export a gated checkpoint (adapters + gate + calibration + manifest).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..adapters import adapters_enabled
from ..atomic_write import write_text_atomically
from ..calibration import CalibrationConfig, CalibrationRecord, calibrate, calibration_batches
from ..config import NonNegativeFloat, NonNegativeInt, PositiveInt, Probability
from ..data.datamodule import VLMDataModule
from ..evaluation.policies import compare_policies, format_results, gate_verdicts, policy_strategies
from ..models import resolve_model_path
from ..training.interrupt import SaveOnInterrupt
from ..training.module import GateDistillModule
from ..training.progress import label_steps
from ..training.run_folder import CALIBRATION, CHECKPOINTS, RunRecord, mark_finished, prepare_output_folder
from ..training.wandb import make_wandb_logger


@dataclass
class SyntheticData:
    """Write the embedded synthetic VQA set to ``data.train_path`` / ``data.val_path`` when missing.

    The seeds differ from the ones the toy model was trained and evaluated on, so the gate is
    trained and judged on samples the base model has never seen.
    """

    train_samples: NonNegativeInt = 0
    """Training samples to write (0: write nothing, use the file as it is)."""
    val_samples: NonNegativeInt = 0
    """Validation samples to write (0: write nothing)."""
    train_seed: int = 101
    """Seed of the training samples."""
    val_seed: int = 202
    """Seed of the validation samples."""


@dataclass
class RunOptions:
    """What happens around ``fit``: calibration, evaluation, export, logging."""

    output_dir: str = "outputs/run"
    """Folder of the run: calibration record, evaluation.json, the gated checkpoint, checkpoints, logs.
    It must be empty, unless the run resumes there (``resume``) or ``overwrite`` is set."""
    overwrite: bool = False
    """Replace whatever an earlier run left in ``output_dir``."""
    calibration: str | None = None
    """An existing calibration record (JSON) to use instead of calibrating."""
    calibration_metric: Literal["first_token", "answer_mean"] = "first_token"
    """KL criterion: at the first answer token (VTW's rule) or averaged over the answer tokens (ours)."""
    calibration_threshold: NonNegativeFloat | None = None
    """eta: K is the first candidate whose mean KL is at most this. None: VTW's value for the model
    (0.003 for LLaVA-1.5-7B and unlisted models, 0.0005 13B, 0.0001 LLaVA-1.6-7B)."""
    calibration_min_layer: NonNegativeInt | None = None
    """Smallest candidate K. None: VTW's (5 on the models it lists, 0 otherwise)."""
    calibration_samples: PositiveInt = 20
    """Training samples the calibration averages over."""
    eval_samples: NonNegativeInt = 200
    """Validation records used for the exact-match comparison (0 skips it)."""
    eval_batch_size: PositiveInt = 32
    """Prompts per generate call in the comparison."""
    eval_taus: list[Probability] = field(default_factory=list)
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
    """A Lightning checkpoint (a local ``.ckpt`` file) to resume training from, into the same ``output_dir``."""
    threads: NonNegativeInt = 0
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
        min_layer=options.calibration_min_layer,
    )
    total = -(-options.calibration_samples // datamodule.batch_size)
    with adapters_enabled(module.model, False):
        return calibrate(module.model, tqdm(batches, total=total, desc="calibration", unit="batch"), config)


def local_checkpoint(resume: str | None) -> str | None:
    """The checkpoint to resume from, if it is a local file; a URL is refused, not unpickled."""
    if resume is None:
        return None
    if "://" in resume:
        raise ValueError(
            f"run.resume {resume!r} is a URL. Remote checkpoints are not loaded (Lightning would unpickle them "
            "with weights_only=False, which runs any code they carry): download it, then pass the local path."
        )
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"run.resume {resume}: no such checkpoint file.")
    return str(path)


def resume_command(checkpoint: Path) -> str:
    """The command line that continues this run from ``checkpoint`` (this one, with --run.resume)."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--run.resume":
            skip = True
            continue
        if arg.startswith("--run.resume="):
            continue
        args.append(arg)
    program = sys.argv[0] if sys.argv[0].startswith("vtw-train") else f"python {sys.argv[0]}"
    return " ".join([program, *(shlex.quote(a) for a in args), "--run.resume", shlex.quote(str(checkpoint))])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cli = GateCLI(
        GateDistillModule,
        VLMDataModule,
        run=False,
        args=None if argv is None else list(argv),
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        trainer_defaults={"use_distributed_sampler": False},
    )
    options: RunOptions = cli.config_init["run"]
    if isinstance(options, dict):
        options = RunOptions(**options)
    resume = local_checkpoint(options.resume)
    trainer = cli.trainer
    if trainer._accelerator_connector.use_distributed_sampler:
        raise ValueError(
            "trainer.use_distributed_sampler must be false: the training data loader shards itself across "
            "ranks, so that its position can be saved in checkpoints."
        )
    if options.threads:
        torch.set_num_threads(options.threads)
    module: GateDistillModule = cli.model
    datamodule: VLMDataModule = cli.datamodule
    # Load the model first: a base that does not load or a setting that does not fit it leaves no folder behind.
    module.configure_model()
    out_dir = Path(options.output_dir)
    # Only rank zero owns the folder: under DDP the other ranks are started later, running this same
    # command, and find the folder rank zero prepared.
    zero = trainer.is_global_zero
    if zero:
        run = prepare_output_folder(
            out_dir, resume=resume, overwrite=options.overwrite, command=list(sys.argv)
        )
    else:
        run = RunRecord.load(out_dir) or RunRecord(run_id="", started="")
    checkpoints = out_dir / CHECKPOINTS
    if trainer.checkpoint_callback is not None:
        trainer.checkpoint_callback.dirpath = str(checkpoints)
    interrupt = SaveOnInterrupt(checkpoints)
    trainer.callbacks.append(interrupt)
    label_steps(trainer)
    logger = (
        make_wandb_logger(options.wandb_project, options.run_name, out_dir, run_id=run.run_id)
        if options.wandb
        else None
    )
    if logger is not None:
        trainer.loggers = [logger]
        logger.log_hyperparams(cli.config.as_dict())
    else:
        keep_default_logger_version(trainer, run.run_id)

    ensure_synthetic_data(datamodule, options.synthetic)
    own_record = out_dir / CALIBRATION
    if options.calibration:
        record = CalibrationRecord.load(options.calibration, model=module.model)
    elif resume and "calibration" in run.finished and own_record.is_file():
        record = CalibrationRecord.load(own_record, model=module.model)  # the K this run started with
        print(f"resuming: using this run's calibration record {own_record}")
    else:
        print(f"calibrating the fixed exit layer on {options.calibration_samples} training samples ...")
        record = calibrate_base(module, datamodule, options)
    if zero:
        record.save(own_record)
        mark_finished(out_dir, run, "calibration")
    print(
        f"calibrated K = {record.exit_layer} ({record.metric} KL <= eta {record.threshold:g}, "
        f"{record.threshold_source or 'set'}; KL curve: "
        + ", ".join(f"{k}:{v:.4f}" for k, v in sorted(record.kl_curve.items()))
        + ")"
    )
    if logger is not None:
        _log_calibration(logger, record)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except SIGTERMException:
        if trainer.is_global_zero and interrupt.saved is not None:
            print(
                f"\ninterrupted at step {trainer.global_step}; resume with:\n  {resume_command(interrupt.saved)}"
            )
        raise SystemExit(130) from None
    if zero:
        mark_finished(out_dir, run, "training")

    summary: dict[str, Any] = {"calibrated_exit_layer": record.exit_layer, "run_id": run.run_id}
    if not trainer.is_global_zero:
        return summary
    if options.eval_samples > 0:
        datamodule.setup("validate")
        records = [datamodule.val_set[i] for i in range(min(options.eval_samples, len(datamodule.val_set)))]
        print(f"evaluating full model, fixed-K VTW and the gate on {len(records)} validation samples ...")
        from tqdm.auto import tqdm

        rows = len(policy_strategies(module.model, module.gate, record.exit_layer, options.eval_taus))
        with tqdm(total=rows * len(records), desc="evaluation", unit="sample", dynamic_ncols=True) as bar:
            results = compare_policies(
                module.model,
                datamodule.processor,
                records,
                module.gate,
                record.exit_layer,
                taus=options.eval_taus,
                batch_size=options.eval_batch_size,
                progress=bar.update,
            )
        table = format_results(results)
        print(table)
        verdicts = gate_verdicts(results)
        for v in verdicts:
            print(v.line())
        summary["results"] = [{k: v for k, v in asdict(r).items() if k != "predictions"} for r in results]
        summary["gate_verdicts"] = [asdict(v) for v in verdicts]
        write_text_atomically(out_dir / "evaluation.json", json.dumps(summary, indent=2) + "\n")
        mark_finished(out_dir, run, "evaluation")
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
        mark_finished(out_dir, run, "export")
        print(f"gated checkpoint written to {path}")
    return summary


def keep_default_logger_version(trainer: Any, run_id: str) -> None:
    """Lightning's default logger numbers a new version folder per start; a resumed run keeps its own."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = []
    for logger in trainer.loggers:
        if type(logger) in (CSVLogger, TensorBoardLogger) and logger._version is None:
            logger = type(logger)(save_dir=logger.save_dir, name=logger.name, version=f"run-{run_id}")
        loggers.append(logger)
    trainer.loggers = loggers


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
