"""The LightningModule: one base model, LoRA adapters on its language model, and the exit gate.

The teacher is the same weights with the adapters disabled (no second copy). Hyperparameters
are primitives so LightningCLI can type-check a YAML against this signature and so Lightning
checkpoints load with ``weights_only=True``. Checkpoints hold only the trainable tensors
(LoRA + gate) and the optimizer/loop state; the frozen base is reloaded from ``model_path``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from ..adapters import LANGUAGE_MODEL_ATTENTION, check_lora_placement
from ..config import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability
from ..engine import attach
from ..gate import ExitGate, GateConfig, Policy
from ..models import ModelSpec, load_model
from .metrics import GateMetrics
from .objective import DistillConfig, StepOutput, distill_step


class GateDistillModule(L.LightningModule):
    """Train LoRA (language model only) and the exit gate on distillation from the frozen base.

    Args:
        model_path: base model directory saved with ``save_pretrained``, or ``toy`` for the
            embedded default.
        lora_target: regex of module names that get LoRA. Anchored on the decoder so the
            vision tower and projector never get adapters (docs/methods.md §14.4).
        gate_min_layer / gate_tau / gate_width / gate_lag / gate_ask_every: see
            :class:`vtw_train.gate.GateConfig` (``gate_lag`` 1: a decision made after layer l withdraws
            from l + 2, read while layer l + 1 runs, so the gate never stalls a GPU).
        policy: the exit policy the exported checkpoint loads with (``gate``, ``fixed`` or
            ``gate_capped``; see :func:`vtw_train.gate.policy_reduction`).
        kd_weight / gate_weight / cost_weight / temperature / kl_threshold / kd_exits / label_rule /
            agree_threshold / ce_ratio: see :class:`vtw_train.training.objective.DistillConfig`.
    """

    def __init__(
        self,
        model_path: str = "toy",
        attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        lora_r: PositiveInt = 8,
        lora_alpha: PositiveFloat = 16,
        lora_dropout: Fraction = 0.0,
        lora_target: str = LANGUAGE_MODEL_ATTENTION,
        gate_width: PositiveInt = 128,
        gate_tau: Probability = 0.5,
        gate_min_layer: NonNegativeInt = 1,
        gate_lag: NonNegativeInt = 1,
        gate_ask_every: PositiveInt = 1,
        policy: Policy = "gate",
        kd_weight: NonNegativeFloat = 1.0,
        gate_weight: NonNegativeFloat = 1.0,
        cost_weight: NonNegativeFloat = 0.05,
        temperature: PositiveFloat = 1.0,
        kl_threshold: NonNegativeFloat = 0.05,
        kd_exits: Literal["all", "random"] = "all",
        label_rule: Literal["kl", "dyvte"] = "kl",
        agree_threshold: Probability = 0.99,
        ce_ratio: PositiveFloat = 1.03,
        learning_rate: PositiveFloat = 1e-3,
        gate_learning_rate: PositiveFloat = 3e-3,
        weight_decay: NonNegativeFloat = 0.0,
        warmup_steps: NonNegativeInt = 10,
        gradient_checkpointing: bool = False,
    ) -> None:
        settings = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        _check_ranges(settings)
        super().__init__()
        # Plain Python values (the parser hands over range-checked subclasses of int and float), so a
        # checkpoint's hparams load with weights_only=True.
        self.save_hyperparameters({k: _plain(v) for k, v in settings.items()})
        self.distill_config = DistillConfig(
            kd_weight=kd_weight,
            gate_weight=gate_weight,
            cost_weight=cost_weight,
            temperature=temperature,
            kl_threshold=kl_threshold,
            kd_exits=kd_exits,
            label_rule=label_rule,
            agree_threshold=float(agree_threshold),
            ce_ratio=float(ce_ratio),
        )
        self.model: nn.Module | None = None
        self.gate: ExitGate | None = None
        self.processor: Any = None
        self.train_metrics = GateMetrics()
        self.val_metrics = GateMetrics()
        self.strict_loading = False  # checkpoints hold only the trainable tensors

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        from peft import LoraConfig, get_peft_model

        hp = self.hparams
        base, self.processor = load_model(
            ModelSpec(path=hp.model_path, attn_implementation=hp.attn_implementation, dtype=hp.dtype)
        )
        base.requires_grad_(False)
        if hp.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        lora = LoraConfig(
            r=int(hp.lora_r),
            lora_alpha=float(hp.lora_alpha),
            lora_dropout=float(hp.lora_dropout),
            target_modules=hp.lora_target,
        )
        model = get_peft_model(base, lora)
        controller = attach(model)
        check_lora_placement(model, controller.language_model, key="model.lora_target")
        if not hp.gate_min_layer < controller.num_layers - 1 - hp.gate_lag:
            raise ValueError(
                f"model.gate_min_layer={hp.gate_min_layer} leaves the gate nothing to decide: this model has "
                f"{controller.num_layers} decoder layers and model.gate_lag is {hp.gate_lag}, so it must be at "
                f"most {controller.num_layers - 2 - hp.gate_lag}."
            )
        text_config = controller.language_model.config
        self.gate = ExitGate(
            GateConfig(
                hidden_size=text_config.hidden_size,
                num_layers=controller.num_layers,
                width=hp.gate_width,
                tau=hp.gate_tau,
                min_layer=hp.gate_min_layer,
                lag=hp.gate_lag,
                ask_every=hp.gate_ask_every,
            )
        ).to(dtype=torch.float32)
        self.model = model

    # ------------------------------------------------------------------ steps
    def _step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        return distill_step(self.model, self.gate, inputs, self.distill_config)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self._step(batch)
        size = out.kl.shape[0]
        self.log_dict(
            {
                "train/loss": out.loss.detach(),
                "train/kd_loss": out.kd_loss,
                "train/gate_loss": out.gate_loss,
                "train/cost_loss": out.cost_loss,
            },
            prog_bar=True,
            batch_size=size,
            sync_dist=True,
        )
        self.train_metrics.update(out)
        return out.loss

    def on_train_epoch_end(self) -> None:
        self.log_dict({f"train/{k}": v for k, v in self.train_metrics.compute().items()}, sync_dist=False)
        self.train_metrics.reset()

    def on_validation_epoch_start(self) -> None:
        self._val_exits: list[torch.Tensor] = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self._step(batch)
        self._val_exits.append(out.gate_exit.detach().cpu())
        self.log_dict(
            {"val/loss": out.loss, "val/kd_loss": out.kd_loss, "val/gate_loss": out.gate_loss},
            batch_size=out.kl.shape[0],
            sync_dist=True,
        )
        self.val_metrics.update(out)

    def on_validation_epoch_end(self) -> None:
        self._log_exit_histogram()
        values = self.val_metrics.compute()
        self.log_dict({f"val/{k}": v for k, v in values.items()}, prog_bar=False)
        self.val_metrics.reset()

    def _log_exit_histogram(self) -> None:
        """Where the gate would exit on the validation batches, as a W&B histogram (rank zero)."""
        from lightning.pytorch.loggers import WandbLogger

        exits = getattr(self, "_val_exits", [])
        loggers = self.trainer.loggers if self._trainer is not None else []
        if not exits or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                values = torch.cat(exits).tolist()
                logger.experiment.log(
                    {"val/gate_exit_layers": wandb.Histogram(values), "trainer/global_step": self.global_step}
                )

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        lora = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": lora, "lr": hp.learning_rate, "weight_decay": hp.weight_decay},
            {"params": list(self.gate.parameters()), "lr": hp.gate_learning_rate, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer else 1
        warmup = min(hp.warmup_steps, max(0, total - 1))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def trainable_state_keys(self) -> set[str]:
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        missing = self.trainable_state_keys() - set(checkpoint["state_dict"])
        if missing:
            raise ValueError(
                f"Checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[:3]}); it was saved "
                "with a different LoRA or gate configuration."
            )


_RANGES = {
    "lora_r": (lambda v: v >= 1, ">= 1"),
    "lora_alpha": (lambda v: v > 0, "> 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "gate_width": (lambda v: v >= 1, ">= 1"),
    "gate_tau": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "gate_min_layer": (lambda v: v >= 0, ">= 0"),
    "kd_weight": (lambda v: v >= 0, ">= 0"),
    "gate_weight": (lambda v: v >= 0, ">= 0"),
    "cost_weight": (lambda v: v >= 0, ">= 0"),
    "temperature": (lambda v: v > 0, "> 0"),
    "kl_threshold": (lambda v: v >= 0, ">= 0"),
    "learning_rate": (lambda v: v > 0, "> 0"),
    "gate_learning_rate": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
}


def _plain(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value if not isinstance(value, str) else str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return value


def _check_ranges(values: dict[str, Any]) -> None:
    """The same ranges the config parser enforces, for modules built in Python."""
    for name, (ok, text) in _RANGES.items():
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ValueError(f"model.{name} must be {text}, got {value!r}.")
