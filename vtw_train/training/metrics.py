"""Step metrics, as torchmetrics so they reduce correctly across DDP ranks."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryCalibrationError

from .objective import StepOutput


class GateMetrics(nn.Module):
    """Agreement with the teacher, KL, exit layer and FLOPs at the gate's decision, gate calibration.

    Each value is measured at the exit the gate picks at its threshold tau, on teacher-forced
    answers: ``agree`` is the fraction of samples whose every answer token matches the
    teacher's argmax, ``kl`` the answer KL(teacher || student), ``exit_layer`` the mean K,
    ``flops_ratio`` the language-model prefill FLOPs relative to the full model;
    ``full_agree`` is the same agreement for the adapted model without any exit.
    ``gate_ece`` is the expected calibration error of p_exit against the safe-exit labels.
    """

    names = ("agree", "kl", "exit_layer", "flops_ratio", "full_agree", "full_kl")

    def __init__(self) -> None:
        super().__init__()
        self.means = nn.ModuleDict({name: MeanMetric() for name in self.names})
        self.gate_ece = BinaryCalibrationError(n_bins=10)

    def update(self, out: StepOutput) -> None:
        columns = torch.tensor(out.exit_layers, device=out.gate_exit.device)
        index = (out.gate_exit.unsqueeze(1) == columns.unsqueeze(0)).float().argmax(1, keepdim=True)
        self.means["agree"].update(out.agree.float().gather(1, index).squeeze(1))
        self.means["kl"].update(out.kl.gather(1, index).squeeze(1))
        self.means["exit_layer"].update(out.gate_exit.float())
        self.means["flops_ratio"].update(out.flops_ratio)
        self.means["full_agree"].update(out.agree[:, -1].float())
        self.means["full_kl"].update(out.kl[:, -1])
        self.gate_ece.update(out.gate_prob.flatten(), out.gate_label.flatten().long())

    def compute(self) -> dict[str, torch.Tensor]:
        values = {name: metric.compute() for name, metric in self.means.items()}
        values["gate_ece"] = self.gate_ece.compute()
        return values

    def reset(self) -> None:
        for metric in self.means.values():
            metric.reset()
        self.gate_ece.reset()
