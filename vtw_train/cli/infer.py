"""``vtw-train infer`` (or ``scripts/infer.py``): answer one question about one image with a gated checkpoint.

Prints the answer, the decoder layer after which the image tokens were withdrawn, and the
prefill FLOPs that saved for this prompt (docs/methods.md §11 FLOPs model), so a user sees what
the gate did on their own input rather than a benchmark average.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..adapters import base_model_of
from ..config import parse_config
from ..flops import DecoderDims, ExitPlan, prefill_flops, token_counts


@dataclass
class PromptCounts:
    """Non-visual and visual prompt tokens of one sample (what the FLOPs model needs)."""

    n_text: int
    n_visual: int


@dataclass
class FlopsSaving:
    """Prefill FLOPs of the full model and under the exit that was taken."""

    full: float
    withdrawn: float

    @property
    def saved_fraction(self) -> float:
        return 0.0 if self.full == 0 else 1.0 - self.withdrawn / self.full


@dataclass
class InferenceResult:
    answer: str
    exit_layer: int
    num_layers: int
    counts: PromptCounts
    flops: FlopsSaving


@dataclass
class InferRun:
    """One question about one image."""

    checkpoint: str
    """Gated checkpoint directory (written by ``vtw-train train`` or ``export_gated_checkpoint``)."""
    image: str
    """Image file (PNG, JPEG, ...)."""
    question: str
    """The question about the image."""
    base_model: str | None = None
    """Base model directory or ``toy`` (default: the one the checkpoint's manifest records)."""
    policy: Literal["gate", "fixed", "gate_capped"] | None = None
    """Exit policy (default: the checkpoint's)."""
    tau: float | None = None
    """Gate threshold override, in (0, 1]."""
    max_new_tokens: int = 32
    """Longest answer in tokens."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Dtype to run in (default: the one the adapter was trained in)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention backend."""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... (auto: cuda when available)."""


def build_prompt(processor: Any, image: Any, question: str) -> dict[str, torch.Tensor]:
    """One user turn with the image and the question, through the model's own chat template.

    The processor expands the image placeholder to the right number of visual tokens, as
    ``vtw_train.data.collate.VLMCollator`` does in generate mode.
    """
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.strip()}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return dict(processor(images=[image], text=[text], return_tensors="pt"))


def prompt_counts(inputs: dict[str, torch.Tensor], visual_token_ids: Sequence[int]) -> PromptCounts:
    """Count visual and other real tokens of a batch-1 prompt."""
    ids = inputs["input_ids"][:1]
    visual = torch.isin(ids, torch.tensor(list(visual_token_ids), device=ids.device))
    mask = inputs.get("attention_mask")
    n_text, n_visual = token_counts(visual, None if mask is None else mask[:1])
    return PromptCounts(n_text=n_text[0], n_visual=n_visual[0])


def flops_saving(config: Any, counts: PromptCounts, exit_layer: int) -> FlopsSaving:
    """Prefill FLOPs of the decoder, full vs withdrawing after ``exit_layer`` layers."""
    dims = DecoderDims.from_config(config)
    full = prefill_flops(dims, counts.n_text, counts.n_visual, ExitPlan())
    withdrawn = prefill_flops(dims, counts.n_text, counts.n_visual, ExitPlan(exit_layer=exit_layer))
    return FlopsSaving(full=full, withdrawn=withdrawn)


def exit_layer_taken(last_exit_layers: torch.Tensor | None, num_layers: int) -> int:
    """The K of the (single) prompt; the engine records nothing when it ran the full model."""
    if last_exit_layers is None or last_exit_layers.numel() == 0:
        return num_layers
    return int(last_exit_layers.reshape(-1)[0])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def answer(vlm: Any, image: Any, question: str, max_new_tokens: int = 32) -> InferenceResult:
    """Greedy-decode an answer with the gate in charge; report the exit and the FLOPs saved."""
    if vlm.processor is None:
        raise ValueError(
            "this model has no processor: load the base from a directory (--base-model) that has one."
        )
    inputs = build_prompt(vlm.processor, image, question)
    counts = prompt_counts(inputs, vlm.controller.visual_token_ids)
    device = next(vlm.model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        output = vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    exit_layer = exit_layer_taken(vlm.last_exit_layers, vlm.num_layers)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    text = vlm.processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
    config = base_model_of(vlm.model).config
    return InferenceResult(text, exit_layer, vlm.num_layers, counts, flops_saving(config, counts, exit_layer))


def format_result(result: InferenceResult, policy: str) -> str:
    k, layers = result.exit_layer, result.num_layers
    where = (
        f"visual tokens withdrawn after {k} of {layers} decoder layers (K = {k})"
        if k < layers
        else f"no withdrawal: all {layers} layers read the visual tokens"
    )
    f = result.flops
    return "\n".join(
        [
            f"answer: {result.answer}",
            f"exit layer: {where}  [policy {policy}]",
            f"prompt: {result.counts.n_text} text + {result.counts.n_visual} visual tokens",
            f"prefill FLOPs: {f.withdrawn / 1e9:.4g} G vs {f.full / 1e9:.4g} G full "
            f"({100 * f.saved_fraction:.1f}% saved)",
        ]
    )


def read_image(path: Path) -> Any:
    """The image at ``path`` as RGB; every way this fails names the file and what is wrong."""
    from PIL import UnidentifiedImageError

    from ..data.records import load_image

    if path.is_dir():
        raise SystemExit(f"--image {path} is a folder; pass an image file (PNG, JPEG, ...).")
    if not path.is_file():
        raise SystemExit(f"--image {path}: no such file.")
    try:
        return load_image(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SystemExit(f"--image {path}: cannot read it as an image ({err}).") from None


def check_question(question: str, processor: Any) -> str:
    """Refuse what the prompt template cannot take; warn about words the model does not know."""
    question = question.strip()
    if not question:
        raise SystemExit("--question is empty; ask something about the image.")
    placeholders = {"<image>", str(getattr(processor, "image_token", "<image>"))}
    found = sorted(p for p in placeholders if p and p in question)
    if found:
        raise SystemExit(
            f"--question contains the image placeholder {found[0]}; leave it out: the prompt template puts the "
            "image in its place."
        )
    tokenizer = getattr(processor, "tokenizer", processor)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        unknown = [w for w in question.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]
        if unknown:
            print(
                f"warning: the model's vocabulary lacks {', '.join(repr(w) for w in unknown)}; "
                f"{'it is' if len(unknown) == 1 else 'they are'} read as {tokenizer.unk_token}.",
                file=sys.stderr,
            )
    return question


def main(argv: Sequence[str] | None = None) -> InferenceResult:
    args = parse_config(InferRun, argv, "vtw-train infer", __doc__ or "")
    from ..checkpoint import GatedVLM

    image = read_image(Path(args.image))
    if args.max_new_tokens < 1:
        raise SystemExit("--max_new_tokens must be >= 1.")
    try:
        vlm = GatedVLM.from_pretrained(
            args.checkpoint,
            base_model=args.base_model,
            dtype=args.dtype,
            attn_implementation=args.attn_implementation,
            policy=args.policy,
            device=resolve_device(args.device),
        )
        if args.tau is not None:
            vlm.set_policy(vlm.policy, tau=args.tau)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    question = check_question(args.question, vlm.processor)
    result = answer(vlm, image, question, args.max_new_tokens)
    print(format_result(result, vlm.policy))
    return result
