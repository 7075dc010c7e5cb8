"""peft in one place: the base model under the adapters, the adapter switch, and where LoRA may sit.

Why one module: the teacher of the distillation loss, the full-model and fixed-K baselines of
every comparison and the timing loop all need "these weights with the LoRA adapters off", and a
LoRA that lands on the vision tower or projector must be refused wherever a model is built or
exported. One implementation of each keeps those uses from drifting apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

#: LoRA on the decoder's attention projections only. Anchored on ``language_model.layers`` because a
#: bare suffix such as ``q_proj`` also matches the CLIP tower's attention (docs/methods.md §14.4).
LANGUAGE_MODEL_ATTENTION = r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"

__all__ = [
    "LANGUAGE_MODEL_ATTENTION",
    "adapters_enabled",
    "base_model_of",
    "check_lora_placement",
    "has_adapters",
    "lora_outside_language_model",
    "set_adapters",
]


def base_model_of(model: nn.Module) -> nn.Module:
    """The model under peft's wrappers (``PeftModel -> LoraModel -> model``), or ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model whose adapters can be switched."""
    return (
        callable(getattr(model, "disable_adapter", None)) and getattr(model, "base_model", None) is not None
    )


def _lora_layers(model: nn.Module) -> list[Any]:
    return [m for m in model.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A")]


def adapters_are_enabled(model: nn.Module) -> bool:
    """True unless the LoRA layers are switched off (a model without adapters counts as enabled)."""
    layers = _lora_layers(model) if has_adapters(model) else []
    return not layers or not bool(layers[0].disable_adapters)


def set_adapters(model: nn.Module, enabled: bool) -> None:
    """Switch a peft model's adapter layers on or off in place; a plain model is left alone.

    This is what ``PeftModel.disable_adapter()`` does on entry and exit. It exists outside a
    ``with`` block because a timing loop configures a strategy in one call and runs it in another.
    """
    if not has_adapters(model):
        return
    tuner: Any = model.base_model
    if enabled:
        tuner.enable_adapter_layers()
    else:
        tuner.disable_adapter_layers()


@contextmanager
def adapters_enabled(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run a block with the adapters on or off, then restore the state they were in.

    ``adapters_enabled(model, False)`` is the frozen teacher: the same weights without a second
    copy (docs/methods.md §14.5). It is a global switch on the modules, so teacher and student
    run one after the other, never concurrently.
    """
    before = adapters_are_enabled(model)
    set_adapters(model, enabled)
    try:
        yield
    finally:
        set_adapters(model, before)


def lora_outside_language_model(model: nn.Module, language_model: nn.Module) -> list[str]:
    """Names of LoRA parameters that are not inside ``language_model`` (there should be none)."""
    inside = {id(p) for p in language_model.parameters()}
    return [name for name, p in model.named_parameters() if "lora_" in name and id(p) not in inside]


def check_lora_placement(model: nn.Module, language_model: nn.Module, key: str = "lora_target") -> None:
    """Refuse LoRA on the vision tower or projector, and a target regex that matched nothing.

    ``key`` names the setting the user should fix in the error.
    """
    stray = lora_outside_language_model(model, language_model)
    if stray:
        raise ValueError(
            f"LoRA weights outside the language model ({len(stray)}, e.g. {stray[0]}): the vision tower and "
            f"projector must stay frozen. Anchor {key} on the decoder, e.g. "
            r"r'.*language_model\.layers\.\d+\.self_attn\.(q|v)_proj' (docs/methods.md §14.4)."
        )
    if not any("lora_" in name for name, _ in model.named_parameters()):
        raise ValueError(f"{key} matched no module of the language model; check the regex.")
