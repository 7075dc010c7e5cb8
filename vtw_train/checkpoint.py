"""The gated checkpoint: LoRA adapter + exit gate + calibration, in one self-checking directory.

Why a directory of small files and no model weights (METHODS.md §14.3): the base model is
tens of gigabytes and already on disk or on a hub, while what training produced is a few
megabytes. The directory is peft's own adapter format plus vtw files that peft ignores, so a
plain ``PeftModel.from_pretrained`` still loads the adapter; :class:`GatedVLM` additionally
checks that the base is the one the adapter and the gate were trained on (a LoRA on the
wrong base loads without complaint and silently produces garbage), verifies every file's
sha256, and installs withdrawal the way it was trained and calibrated.

Layout::

    adapter_config.json        peft (base_model_name_or_path recorded)
    adapter_model.safetensors  peft: LoRA tensors only
    exit_gate.safetensors      gate state dict        (when a gate was trained)
    exit_gate_config.json      GateConfig             (when a gate was trained)
    vtw_calibration.json       CalibrationRecord      (when calibrated)
    vtw_config.json            manifest: versions, base fingerprint, sizes, policy, file sha256s
    README.md                  model card

Nothing here calls ``torch.load``: weights are safetensors, everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibrate import CalibrationRecord, library_versions
from .engine.controller import ExitController, attach
from .fingerprint import model_fingerprint
from .gate import ExitGate, GateConfig, Policy, apply_policy

FORMAT = "vtw-gated/1"
MANIFEST = "vtw_config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GATE_WEIGHTS = "exit_gate.safetensors"
GATE_CONFIG = "exit_gate_config.json"
CALIBRATION = "vtw_calibration.json"
MODEL_CARD = "README.md"
#: Files that must never sit at the top: they would make the directory look like a full model.
FORBIDDEN_AT_TOP = ("config.json", "model.safetensors")
#: Not hashed: the manifest cannot contain its own hash, and the card is for people to edit.
UNHASHED = (MANIFEST, MODEL_CARD)
POLICIES: tuple[str, ...] = ("gate", "fixed", "gate_capped")
ADAPTER_NAME = "default"

__all__ = [
    "FORMAT",
    "GatedVLM",
    "export_gated_checkpoint",
    "lora_outside_language_model",
    "model_card",
    "policy_as",
    "read_manifest",
    "verify_checkpoint",
]


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_gated_checkpoint(
    out_dir: str | os.PathLike,
    model: nn.Module,
    gate: ExitGate | None,
    calibration: CalibrationRecord | None,
    *,
    base_model_name_or_path: str,
    base_model_revision: str | None = None,
    policy: Policy = "gate",
    overwrite: bool = False,
) -> Path:
    """Write the gated checkpoint of a LoRA-adapted model to ``out_dir`` and return its path.

    ``model`` is a peft ``PeftModel`` whose LoRA sits on the language model only (a LoRA on
    the vision tower or projector is refused, METHODS.md §14.4). ``base_model_name_or_path``
    is what loaders will load as the base (a directory, a hub id, or ``toy``). ``policy`` is
    the default exit policy at load; without a gate it is always ``fixed``.

    The directory is written into a temporary sibling and renamed into place, so a crash
    never leaves a half-written checkpoint; an existing non-empty ``out_dir`` is replaced
    only with ``overwrite=True``.
    """
    out = Path(out_dir)
    _check_policy(policy)
    _check_exportable(model, gate, calibration)
    _check_target(out, overwrite)
    if gate is None:
        policy = "fixed"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _write_adapter(model, tmp, base_model_name_or_path, base_model_revision)
        if gate is not None:
            _write_gate(gate, tmp)
        if calibration is not None:
            calibration.save(tmp / CALIBRATION)
        manifest = _build_manifest(
            model, gate, calibration, base_model_name_or_path, base_model_revision, policy
        )
        (tmp / MODEL_CARD).write_text(model_card(manifest, gate, calibration))
        manifest["files"] = {name: _sha256(tmp / name) for name in _hashed_files(tmp)}
        _write_json(tmp / MANIFEST, manifest)
        _check_layout(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"Unknown exit policy {policy!r}; use one of {', '.join(POLICIES)}.")


def _check_exportable(model: nn.Module, gate: ExitGate | None, calibration: CalibrationRecord | None) -> None:
    """Refuse what would load wrongly later, while the trainer can still fix it."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"export_gated_checkpoint needs a peft PeftModel (the LoRA-adapted model), got {type(model).__name__}."
        )
    if list(model.peft_config) != [ADAPTER_NAME]:
        raise ValueError(
            f"export_gated_checkpoint saves exactly one adapter named {ADAPTER_NAME!r}; this model has "
            f"{list(model.peft_config)}. Merge or delete the others first."
        )
    stray = lora_outside_language_model(model)
    if stray:
        raise ValueError(
            f"LoRA weights outside the language model ({len(stray)}, e.g. {stray[0]}): the vision tower and "
            "projector must stay frozen. Anchor LoraConfig.target_modules on the decoder, e.g. "
            r"r'.*language_model\.layers\.\d+\.self_attn\.(q|v)_proj' (METHODS.md §14.4)."
        )
    controller = attach(model)
    if gate is not None:
        _check_gate_sizes(gate.config, controller, _hidden_size(model), "the gate")
    if calibration is not None and calibration.num_layers != controller.num_layers:
        raise ValueError(
            f"The calibration record is for a {calibration.num_layers}-layer decoder; the model has "
            f"{controller.num_layers}. Recalibrate this model."
        )


def lora_outside_language_model(model: nn.Module) -> list[str]:
    """Names of LoRA parameters that are not inside the decoder (should be none)."""
    controller = attach(model)
    lm_params = {id(p) for p in controller.language_model.parameters()}
    return [name for name, p in model.named_parameters() if "lora_" in name and id(p) not in lm_params]


def _check_gate_sizes(config: GateConfig, controller: ExitController, hidden: int, what: str) -> None:
    if config.num_layers != controller.num_layers or config.hidden_size != hidden:
        raise ValueError(
            f"{what} was built for a {config.num_layers}-layer decoder of width {config.hidden_size}; "
            f"the model has {controller.num_layers} layers of width {hidden}."
        )


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another output path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} is not empty; pass overwrite=True to replace it, or choose another output directory."
        )


def _write_adapter(model: nn.Module, tmp: Path, base: str, revision: str | None) -> None:
    """peft's own files, with the base recorded (peft would record whatever name_or_path was)."""
    config = model.peft_config[ADAPTER_NAME]
    saved = (config.base_model_name_or_path, config.revision)
    config.base_model_name_or_path, config.revision = base, revision
    try:
        model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
    finally:
        config.base_model_name_or_path, config.revision = saved


def _write_gate(gate: ExitGate, tmp: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in gate.state_dict().items()}
    save_file(state, str(tmp / GATE_WEIGHTS), metadata={"format": "pt", "vtw": FORMAT})
    gate.config.save(tmp / GATE_CONFIG)


def _hidden_size(model: nn.Module) -> int:
    return int(_base_of(model).config.get_text_config(decoder=True).hidden_size)


def _base_of(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _image_token_id(config: Any) -> int | None:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def _dtype_name(model: nn.Module) -> str:
    return str(next(_base_of(model).parameters()).dtype).removeprefix("torch.")


def _build_manifest(
    model: nn.Module,
    gate: ExitGate | None,
    calibration: CalibrationRecord | None,
    base: str,
    revision: str | None,
    policy: str,
) -> dict[str, Any]:
    controller = attach(model)
    base_model = _base_of(model)
    return {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "base_model": base,
        "base_model_revision": revision,
        "base_model_fingerprint": model_fingerprint(model),
        "base_model_dtype": _dtype_name(model),
        "model_type": base_model.config.model_type,
        "model_class": type(base_model).__name__,
        "num_layers": controller.num_layers,
        "hidden_size": _hidden_size(model),
        "image_token_id": _image_token_id(base_model.config),
        "visual_token_ids": list(controller.visual_token_ids),
        "fallback_exit_layer": None if calibration is None else calibration.exit_layer,
        "policy": policy,
        "has_gate": gate is not None,
        "files": {},
    }


def _hashed_files(directory: Path) -> list[str]:
    names = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()]
    return sorted(n for n in names if n not in UNHASHED)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _check_layout(directory: Path) -> None:
    bad = [name for name in FORBIDDEN_AT_TOP if (directory / name).exists()]
    if bad:
        raise RuntimeError(f"refusing to write {bad} at the top of a gated checkpoint (METHODS.md §14.3).")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory over ``out``; an old one is moved aside first, then deleted."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, trash / out.name)
    os.replace(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)


def model_card(
    manifest: Mapping[str, Any], gate: ExitGate | None, calibration: CalibrationRecord | None
) -> str:
    """The README: what the directory is, how to load it, and what K and the gate do."""
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
        "from vtw_train.checkpoint import GatedVLM",
        "",
        'vlm = GatedVLM.from_pretrained("THIS_DIR")  # or base_model=<path or loaded model>',
        "out = vlm.generate(**inputs, max_new_tokens=32)",
        "print(vlm.last_exit_layers)",
        "```",
        "",
        "or from the command line:",
        "",
        "```bash",
        'python scripts/infer.py --checkpoint THIS_DIR --image img.png --question "What is shown?"',
        "```",
        "",
        "`peft.PeftModel.from_pretrained(base, THIS_DIR)` loads the adapter alone (no withdrawal).",
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


# ---------------------------------------------------------------------------------------------
# Checking a directory
# ---------------------------------------------------------------------------------------------


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``vtw_config.json``, with its format checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Gated checkpoint {directory} does not exist or is not a directory.")
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {directory} is not a vtw gated checkpoint. Write one with "
            "vtw_train.checkpoint.export_gated_checkpoint (a bare peft adapter loads with PeftModel.from_pretrained)."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-export the checkpoint.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(
            f"{path}: format {found!r} is not {FORMAT!r}; this vtw-train reads {FORMAT} checkpoints only. "
            "Re-export it with this version."
        )
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}; re-export the checkpoint.")
    return manifest


_REQUIRED_KEYS = (
    "base_model",
    "base_model_fingerprint",
    "base_model_dtype",
    "model_class",
    "num_layers",
    "fallback_exit_layer",
    "policy",
    "files",
)


def verify_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Check the manifest and every listed file's sha256; return the manifest.

    Reads only bytes, loads no tensors: a corrupt or truncated download is reported by file
    name before anything is deserialised.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    files: dict[str, str] = manifest["files"]
    required = [ADAPTER_CONFIG, ADAPTER_WEIGHTS] + (
        [GATE_CONFIG, GATE_WEIGHTS] if manifest.get("has_gate") else []
    )
    for name in required:
        if name not in files:
            raise ValueError(f"{directory / MANIFEST} does not list {name}; re-export the checkpoint.")
    for name, expected in sorted(files.items()):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(
                f"{directory / MANIFEST} lists {name!r}, which is outside the checkpoint; re-export."
            )
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing from the gated checkpoint (listed in {MANIFEST}); copy the whole "
                "directory again or re-export it."
            )
        found = _sha256(path)
        if found != expected:
            raise ValueError(
                f"{path} is corrupt or was modified: sha256 {found[:16]}... but {MANIFEST} records "
                f"{expected[:16]}.... Copy the file again or re-export the checkpoint."
            )
    for name in FORBIDDEN_AT_TOP:
        if (directory / name).exists():
            raise ValueError(
                f"{directory / name} should not be in a gated checkpoint (it holds no base weights); remove it."
            )
    return manifest


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class GatedVLM:
    """A LoRA-adapted multimodal model with withdrawal installed as it was trained.

    Calls go to the wrapped ``PeftModel`` (``forward``, ``__call__``, ``generate``), so the gate
    decides in both teacher-forced scoring and generation. ``set_policy`` switches between the
    learned gate, the calibrated fixed K, and the gate capped at K at run time.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        gate: ExitGate | None,
        calibration: CalibrationRecord | None,
        manifest: Mapping[str, Any],
        processor: Any = None,
        policy: Policy | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.gate = gate
        self.calibration = calibration
        self.manifest = dict(manifest)
        self.controller: ExitController = attach(model)
        self._policy: Policy = "fixed"
        self.set_policy(policy or self.manifest.get("policy", "gate"))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        checkpoint_dir: str | os.PathLike,
        base_model: nn.Module | str | os.PathLike | None = None,
        *,
        processor: Any = None,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str = "sdpa",
        policy: Policy | None = None,
        device: torch.device | str | None = None,
    ) -> GatedVLM:
        """Load a gated checkpoint onto its base model.

        base_model: a loaded module (wrapped in place), a directory (or ``toy``), or None for
            the base recorded in the manifest.
        dtype: the dtype to run in. The base is loaded in the dtype it was trained in, checked
            against the recorded fingerprint (which is dtype-specific), then cast.
        attn_implementation: used when the base is loaded from a path.
        policy: overrides the policy recorded at export (``gate``, ``fixed`` or ``gate_capped``).

        Every problem with the directory or the base raises ValueError / FileNotFoundError
        naming the file or the mismatch and how to fix it.
        """
        directory = Path(checkpoint_dir)
        manifest = verify_checkpoint(directory)
        if policy is not None:
            _check_policy(policy)
        base, loaded_processor = _load_base(manifest, base_model, attn_implementation)
        _check_base(manifest, base, directory)
        calibration = _load_calibration(directory, manifest)
        target = _resolve_dtype(dtype)
        if target is not None:
            base.to(target)
        model = _load_adapter(base, directory)
        gate = _load_gate(directory, manifest, model)
        if device is not None:
            model.to(device)
        if gate is not None:
            gate.to(next(model.parameters()).device)
        return cls(
            model.eval(),
            gate=gate,
            calibration=calibration,
            manifest=manifest,
            processor=processor if processor is not None else loaded_processor,
            policy=policy,
        )

    # ------------------------------------------------------------------ policy
    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def fixed_exit_layer(self) -> int | None:
        """The calibrated K (None: not calibrated, the full model is the fallback)."""
        return None if self.calibration is None else self.calibration.exit_layer

    def set_policy(self, policy: Policy, tau: float | None = None) -> None:
        """Switch the exit rule: ``gate``, ``fixed`` (calibrated K) or ``gate_capped`` (gate, at most K).

        ``tau`` changes the gate's firing threshold (higher exits later and more safely).
        """
        _check_policy(policy)
        if policy != "fixed" and self.gate is None:
            raise ValueError(
                f"policy {policy!r} needs an exit gate, and this checkpoint has none; use policy 'fixed' "
                "(the calibrated K)."
            )
        if tau is not None:
            if self.gate is None:
                raise ValueError("tau sets the exit gate's threshold, and this checkpoint has no gate.")
            if not 0.0 < tau <= 1.0:
                raise ValueError(f"gate tau must be in (0, 1], got {tau}.")
            self.gate.config.tau = float(tau)
        apply_policy(self.model, self.gate, policy, self.fixed_exit_layer)
        self._policy = policy

    @property
    def last_exit_layers(self) -> torch.Tensor | None:
        """K per sample of the last prefill; None when the engine did not withdraw (full model)."""
        return self.controller.last_exit_layers

    @property
    def num_layers(self) -> int:
        return self.controller.num_layers

    # ------------------------------------------------------------------ calls
    def forward(self, **kwargs: Any) -> Any:
        """The model's forward with withdrawal under the current policy."""
        self.controller.last_exit_layers = None
        return self.model(**kwargs)

    __call__ = forward

    def generate(self, **kwargs: Any) -> Any:
        """``generate`` with withdrawal; visual token ids are never emitted (ENGINE_NOTES trap 7)."""
        self.controller.last_exit_layers = None
        if "suppress_tokens" not in kwargs:
            suppress = self._suppress_tokens(kwargs.get("generation_config"))
            if suppress is not None:
                kwargs["suppress_tokens"] = suppress
        return self.model.generate(**kwargs)

    def _suppress_tokens(self, generation_config: Any) -> list[int] | None:
        config = generation_config or getattr(_base_of(self.model), "generation_config", None)
        current = list(getattr(config, "suppress_tokens", None) or [])
        missing = [t for t in self.controller.visual_token_ids if t not in current]
        return current + missing if missing else None

    def to(self, *args: Any, **kwargs: Any) -> GatedVLM:
        """Move the model, and the gate to the model's device (the gate keeps its own dtype)."""
        self.model.to(*args, **kwargs)
        if self.gate is not None:
            self.gate.to(next(self.model.parameters()).device)
        return self

    def __repr__(self) -> str:
        return (
            f"GatedVLM(base={self.manifest.get('base_model')!r}, policy={self.policy!r}, "
            f"K={self.fixed_exit_layer}, gate={'yes' if self.gate is not None else 'no'})"
        )


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(
            f"dtype {dtype!r} is not a torch dtype; use e.g. 'bfloat16', 'float16' or 'float32'."
        )
    return value


def _load_base(
    manifest: Mapping[str, Any], base_model: nn.Module | str | os.PathLike | None, attn_implementation: str
) -> tuple[nn.Module, Any]:
    """The base module (and its processor when loaded from a path), in the recorded dtype."""
    if isinstance(base_model, nn.Module):
        if callable(getattr(base_model, "get_base_model", None)):
            raise ValueError(
                "base_model is already a peft model; pass the bare base model (the adapter comes from the checkpoint)."
            )
        return base_model, None
    from .models import ModelSpec, load_model, resolve_model_path

    source = str(base_model) if base_model is not None else str(manifest["base_model"])
    try:
        path = resolve_model_path(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"Cannot find the base model {source!r} ({err}). Pass base_model=<directory or loaded model> "
            "(scripts/infer.py: --base-model)."
        ) from err
    dtype = manifest["base_model_dtype"]
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{MANIFEST}: base_model_dtype {dtype!r} is not float32, bfloat16 or float16.")
    spec = ModelSpec(path=str(path), dtype=dtype, attn_implementation=attn_implementation)  # type: ignore[arg-type]
    return load_model(spec)


def _check_base(manifest: Mapping[str, Any], base: nn.Module, directory: Path) -> None:
    """Class, depth, image token and weights must be those the checkpoint was trained on."""
    base = _base_of(base)
    where = f"{directory / MANIFEST}"
    expected_class = manifest["model_class"]
    if type(base).__name__ != expected_class:
        raise ValueError(
            f"this checkpoint was trained on a {expected_class} ({manifest['base_model']}); got a "
            f"{type(base).__name__}. Pass the right base_model ({where})."
        )
    layers = int(base.config.get_text_config(decoder=True).num_hidden_layers)
    if layers != manifest["num_layers"]:
        raise ValueError(
            f"this checkpoint was trained on a {manifest['num_layers']}-layer decoder "
            f"({manifest['base_model']}); the given base has {layers} layers. Pass the right base_model ({where})."
        )
    image_token = _image_token_id(base.config)
    if manifest.get("image_token_id") is not None and image_token != manifest["image_token_id"]:
        raise ValueError(
            f"this checkpoint was trained with image token id {manifest['image_token_id']}; the given base uses "
            f"{image_token}. Pass the right base_model ({where})."
        )
    found = model_fingerprint(base)
    if found != manifest["base_model_fingerprint"]:
        dtype = _dtype_name(base)
        hint = (
            f" It is in {dtype} but the checkpoint was trained in {manifest['base_model_dtype']}: load it in "
            f"{manifest['base_model_dtype']} (from_pretrained casts afterwards with dtype=...)."
            if dtype != manifest["base_model_dtype"]
            else " Pass the base model it was trained on."
        )
        raise ValueError(
            f"this checkpoint was trained on base {manifest['base_model']} (fingerprint "
            f"{manifest['base_model_fingerprint'][:23]}...), got a model with fingerprint {found[:23]}....{hint}"
        )


def _load_calibration(directory: Path, manifest: Mapping[str, Any]) -> CalibrationRecord | None:
    """The record, checked against the manifest (whose base fingerprint was checked already)."""
    path = directory / CALIBRATION
    if CALIBRATION not in manifest["files"]:
        if manifest["fallback_exit_layer"] is not None:
            raise ValueError(
                f"{directory / MANIFEST} names a fallback K but lists no {CALIBRATION}; re-export."
            )
        return None
    record = CalibrationRecord.load(path)
    if record.model_fingerprint != manifest["base_model_fingerprint"]:
        raise ValueError(
            f"{path} was made for a different base model than the adapter ({record.model_fingerprint[:23]}... vs "
            f"{manifest['base_model_fingerprint'][:23]}...); recalibrate and re-export."
        )
    if record.exit_layer != manifest["fallback_exit_layer"] or record.num_layers != manifest["num_layers"]:
        raise ValueError(f"{path} disagrees with {MANIFEST} on K or the number of layers; re-export.")
    return record


def _load_adapter(base: nn.Module, directory: Path) -> nn.Module:
    """``PeftModel.from_pretrained`` (inference mode), then prove every LoRA tensor arrived intact."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base, str(directory), adapter_name=ADAPTER_NAME, is_trainable=False)
    except Exception as err:  # peft raises many types for a bad adapter_config.json
        raise ValueError(
            f"peft could not load the adapter in {directory} ({type(err).__name__}: {err}); "
            f"check {ADAPTER_CONFIG} against the base model, or re-export."
        ) from err
    _check_adapter_weights(model, directory / ADAPTER_WEIGHTS)
    return model


def _check_adapter_weights(model: nn.Module, path: Path) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(path))
    loaded = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    missing = sorted(set(loaded) - set(saved))
    unexpected = sorted(set(saved) - set(loaded))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the adapter's modules: {len(missing)} LoRA keys missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unused (e.g. {unexpected[:2]}). The adapter was trained "
            "on a different architecture or target_modules; pass the right base model or re-export."
        )
    changed = [k for k, v in saved.items() if not torch.equal(loaded[k].detach().to("cpu", v.dtype), v)]
    if changed:
        raise ValueError(
            f"{path}: LoRA tensors {changed[:2]} did not load as saved; re-export the checkpoint."
        )


def _load_gate(directory: Path, manifest: Mapping[str, Any], model: nn.Module) -> ExitGate | None:
    if not manifest.get("has_gate"):
        return None
    from safetensors.torch import load_file

    try:
        config = GateConfig.load(directory / GATE_CONFIG)
    except (TypeError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"{directory / GATE_CONFIG} is not a valid gate config ({err}); re-export.") from err
    _check_gate_sizes(config, attach(model), _hidden_size(model), str(directory / GATE_CONFIG))
    gate = ExitGate(config)
    state = load_file(str(directory / GATE_WEIGHTS))
    try:
        gate.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{directory / GATE_WEIGHTS} does not fit {GATE_CONFIG} ({_first_line(err)}); re-export the checkpoint."
        ) from None
    return gate.eval()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return " ".join(line.strip() for line in text[:3])


@contextmanager
def policy_as(vlm: GatedVLM, policy: Policy) -> Iterator[GatedVLM]:
    """Temporarily run ``vlm`` under another policy (for A/B comparisons)."""
    previous = vlm.policy
    vlm.set_policy(policy)
    try:
        yield vlm
    finally:
        vlm.set_policy(previous)
