"""The model card (README.md) of a gated checkpoint: what it is, how to load it, what K and the gate do."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..calibration import CalibrationRecord
from ..gate import ExitGate


def model_card(
    manifest: Mapping[str, Any],
    gate: ExitGate | None,
    calibration: CalibrationRecord | None,
    location: str = "path/to/this/folder",
) -> str:
    """The README: what the directory is, how to load it, and what K and the gate do.

    ``location`` is the folder's path as it was written, so the examples run as printed.
    """
    lines = [
        f"# Gated visual-token withdrawal adapter for `{manifest['base_model']}`",
        "",
        "A LoRA adapter on the language model plus a learned exit gate, made with vtw-train. At inference",
        "the image tokens are withdrawn from the decoder after the layer the gate (or the calibrated fixed",
        "layer K) picks, which saves prefill FLOPs with little change to the answers.",
        "",
        "This directory holds no base-model weights: load the base separately.",
        "",
        "## Load",
        "",
        "```python",
        "from vtw_train import GatedVLM",
        "",
        f'vlm = GatedVLM.from_pretrained("{location}")  # or base_model=<path or loaded model>',
        "out = vlm.generate(**inputs, max_new_tokens=32)",
        "print(vlm.last_exit_layers)",
        "```",
        "",
        "or from the command line:",
        "",
        "```bash",
        f'vtw-train infer --checkpoint {location} --image img.png --question "What is shown?"',
        "```",
        "",
        f'`peft.PeftModel.from_pretrained(base, "{location}")` loads the adapter alone (no withdrawal).',
        "",
        "## Base model",
        "",
        f"- base: `{manifest['base_model']}`"
        + (f" (revision `{manifest['base_model_revision']}`)" if manifest.get("base_model_revision") else ""),
        f"- class: `{manifest['model_class']}` (`{manifest['model_type']}`), {manifest['num_layers']} decoder "
        f"layers, dtype {manifest['base_model_dtype']}",
        f"- fingerprint: `{manifest['base_model_fingerprint']}` (checked at load)",
        "",
        "## Exit policy",
        "",
        f"- default policy: `{manifest['policy']}`",
        f"- fallback exit layer K: {_k_text(manifest['fallback_exit_layer'], manifest['num_layers'])}",
    ]
    lines += _gate_section(gate) + _calibration_section(calibration)
    versions = ", ".join(f"{k} {v}" for k, v in manifest["versions"].items())
    lines += ["", "## Made with", "", f"{versions}; format `{manifest['format']}`.", ""]
    return "\n".join(lines)


def _k_text(k: int | None, num_layers: int) -> str:
    if k is None:
        return "none (no calibration: the full model is the fallback)"
    return f"{k} of {num_layers}"


def _gate_section(gate: ExitGate | None) -> list[str]:
    if gate is None:
        return ["- exit gate: none (the calibrated fixed K is used)"]
    cfg = gate.config
    params = sum(p.numel() for p in gate.parameters())
    return [
        f"- exit gate: one shared MLP router, width {cfg.width}, {params:,} parameters; fires when "
        f"p_exit >= tau = {cfg.tau}, after layer {cfg.min_layer} at the earliest",
        f"- gate candidate layers: {cfg.candidate_layers}",
    ]


def _calibration_section(calibration: CalibrationRecord | None) -> list[str]:
    if calibration is None:
        return []
    lines = [
        "",
        "## Calibration (KL criterion)",
        "",
        f"K = {calibration.exit_layer}: the first layer whose mean KL(P_K || P_full) over "
        f"{calibration.num_samples} samples ({calibration.metric}) is at most eta = {calibration.threshold}.",
        "",
        "| K | mean KL |",
        "|---|---------|",
    ]
    for k, kl in sorted(calibration.kl_curve.items()):
        mark = " **<- K**" if k == calibration.exit_layer else ""
        lines.append(f"| {k} | {kl:.5f}{mark} |")
    return lines
