"""Gated checkpoints: the on-disk format, export, and ``GatedVLM`` (load and run).

export_gated_checkpoint(out_dir, peft_model, gate, calibration, base_model_name_or_path=...)
vlm = GatedVLM.from_pretrained(out_dir)      # checks every file and the base, installs the gate
verify_checkpoint(out_dir)                   # the manifest, after checking every file's sha256
"""

from .card import model_card
from .export import export_gated_checkpoint
from .format import FORMAT, read_manifest, verify_checkpoint
from .gated_vlm import GatedVLM, policy_as

__all__ = [
    "FORMAT",
    "GatedVLM",
    "export_gated_checkpoint",
    "model_card",
    "policy_as",
    "read_manifest",
    "verify_checkpoint",
]
