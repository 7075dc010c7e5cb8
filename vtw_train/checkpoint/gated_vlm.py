"""``GatedVLM``: a base model with a gated checkpoint's adapter, gate and calibration installed.

Loading checks before it trusts: the directory's files against their sha256, the base model's
class, depth, image token and weights against the fingerprint the adapter was trained on (a
LoRA on the wrong base loads without complaint and silently produces garbage), every LoRA tensor
against the file, and the gate against its config. Then withdrawal is installed the way it was
trained and calibrated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import base_model_of
from ..calibration import CalibrationRecord
from ..engine import ExitController, attach
from ..fingerprint import model_fingerprint
from ..gate import ExitGate, GateConfig, Policy, check_policy, policy_reduction
from .format import (
    ADAPTER_CONFIG,
    ADAPTER_NAME,
    ADAPTER_WEIGHTS,
    CALIBRATION,
    GATE_CONFIG,
    GATE_WEIGHTS,
    MANIFEST,
    check_gate_sizes,
    dtype_name,
    hidden_size,
    image_token_id,
    verify_checkpoint,
)


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
        self.processor = left_padding(processor)
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
            check_policy(policy)
        base, loaded_processor = _load_base(manifest, base_model, attn_implementation, directory)
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
        check_policy(policy)
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
        self.controller.reduction = policy_reduction(policy, self.gate, self.fixed_exit_layer)
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
        """``generate`` with withdrawal; visual token ids are never emitted (docs/engine.md, trap 7).

        Batched prompts must be padded on the left: generation appends after the last column, so a
        right-padded prompt would continue from its padding (mostly empty answers). They are refused.
        """
        check_left_padded(kwargs.get("attention_mask"))
        self.controller.last_exit_layers = None
        if "suppress_tokens" not in kwargs:
            suppress = self._suppress_tokens(kwargs.get("generation_config"))
            if suppress is not None:
                kwargs["suppress_tokens"] = suppress
        return self.model.generate(**kwargs)

    def _suppress_tokens(self, generation_config: Any) -> list[int] | None:
        config = generation_config or getattr(base_model_of(self.model), "generation_config", None)
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


def left_padding(processor: Any) -> Any:
    """The processor, set to pad on the left (what batched generation needs), or None."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer is not None and hasattr(tokenizer, "padding_side"):
        tokenizer.padding_side = "left"
    return processor


def check_left_padded(attention_mask: Any) -> None:
    """Refuse prompts with padding after a real token (right padding) before ``generate`` starts."""
    if (
        not isinstance(attention_mask, torch.Tensor)
        or attention_mask.dim() != 2
        or attention_mask.shape[1] < 2
    ):
        return
    mask = attention_mask.bool()
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError(
            "generate() got right-padded prompts (padding after real tokens): generation appends after the last "
            "column, so those rows would continue from padding. Pad on the left: "
            "processor.tokenizer.padding_side = 'left' (GatedVLM.processor already does)."
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
    manifest: Mapping[str, Any],
    base_model: nn.Module | str | os.PathLike | None,
    attn_implementation: str,
    directory: Path,
) -> tuple[nn.Module, Any]:
    """The base module (and its processor when loaded from a path), in the recorded dtype.

    A hub id is loaded from the local Hugging Face cache only: loading a checkpoint never waits on a
    network (where there is none, that is a long stall ending in a connection error).
    """
    if isinstance(base_model, nn.Module):
        if callable(getattr(base_model, "get_base_model", None)):
            raise ValueError(
                "base_model is already a peft model; pass the bare base model (the adapter comes from the checkpoint)."
            )
        return base_model, None
    from ..models import ModelSpec, load_model, resolve_model_path

    source = str(base_model) if base_model is not None else str(manifest["base_model"])
    try:
        path = resolve_model_path(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"Cannot find the base model {source!r} ({err}). Pass base_model=<directory or loaded model> "
            "(vtw-train infer: --base_model)."
        ) from err
    dtype = manifest["base_model_dtype"]
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{MANIFEST}: base_model_dtype {dtype!r} is not float32, bfloat16 or float16.")
    if not isinstance(path, Path):  # a hub id: its snapshot in the local cache, or a clear error
        from huggingface_hub import snapshot_download

        try:
            path = Path(
                snapshot_download(source, revision=manifest.get("base_model_revision"), local_files_only=True)
            )
        except Exception:  # huggingface_hub raises several types for "not cached"
            origin = (
                "was given as base_model" if base_model is not None else f"is named by {directory / MANIFEST}"
            )
            raise FileNotFoundError(
                f"The base model {source!r} {origin}: a Hugging Face hub id that is not in the local cache, and "
                "loading a checkpoint does not download. Download it first (huggingface-cli download "
                f"{source}) or pass base_model=<local directory> (vtw-train infer: --base_model)."
            ) from None
    spec = ModelSpec(path=str(path), dtype=dtype, attn_implementation=attn_implementation)  # type: ignore[arg-type]
    return load_model(spec)


def _check_base(manifest: Mapping[str, Any], base: nn.Module, directory: Path) -> None:
    """Class, depth, image token and weights must be those the checkpoint was trained on."""
    base = base_model_of(base)
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
    image_token = image_token_id(base.config)
    if manifest.get("image_token_id") is not None and image_token != manifest["image_token_id"]:
        raise ValueError(
            f"this checkpoint was trained with image token id {manifest['image_token_id']}; the given base uses "
            f"{image_token}. Pass the right base_model ({where})."
        )
    found = model_fingerprint(base)
    if found != manifest["base_model_fingerprint"]:
        dtype = dtype_name(base)
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
    check_gate_sizes(config, attach(model), hidden_size(model), str(directory / GATE_CONFIG))
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
