"""Training under withdrawal: the loss and every gradient equal those of the hand-written reference
loop (so gradients flow through the text-only layers, and into the vision tower and projector
through the layers before K), gradient checkpointing changes nothing, and a peft LoRA on the
language model composes with the engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_LAYERS, max_abs_diff, mixed_specs, text_positions
from engine_helpers import collate, singles
from peft import LoraConfig, get_peft_model
from reference_loop import reference_logits
from torch.testing import assert_close

import vtw_train
from vtw_train.tiny_models import tiny_model, visual_token_mask

L = NUM_LAYERS
# reference_logits is decorated with torch.no_grad(); its undecorated body gives gradients.
reference_logits_with_grad = reference_logits.__wrapped__
VISION_PREFIXES = (
    "model.vision_tower.",
    "model.visual.",
    "model.multi_modal_projector.",
    "model.image_newline",
)
LORA_TARGETS = r".*language_model\.layers\.\d+\.self_attn\.(q|v)_proj"


def _labels(model, sample: dict[str, torch.Tensor]) -> torch.Tensor:
    """Supervise the text positions after the (first) image whose predecessor is text too: the
    answer tokens of a prompt. Everything else, visual positions included, is -100. A sample
    without images is supervised on its last three tokens."""
    ids = sample["input_ids"][0]
    visual = visual_token_mask(model, ids)
    n = ids.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    if bool(visual.any()):
        first = int(visual.nonzero()[0])
        keep[first + 1 :] = True
    else:
        keep[n - 3 :] = True
    keep[1:] &= ~visual[1:] & ~visual[:-1]
    keep[0] = False
    assert bool(keep.any()), "test sample has no supervised token"
    return torch.where(keep, ids, torch.full_like(ids, -100))[None]


def _collate_labels(labels: list[torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = torch.full_like(batch["input_ids"], -100)
    for b, lab in enumerate(labels):
        out[b, batch["attention_mask"][b].bool()] = lab[0]
    return out


def _reference_loss(model, samples, labels, exits) -> torch.Tensor:
    """Mean next-token cross-entropy over all supervised tokens of the batch, from the reference
    loop's logits (each supervised token is predicted from a text position)."""
    total = 0.0
    count = 0
    for sample, lab, k in zip(samples, labels, exits, strict=True):
        logits, index = reference_logits_with_grad(model, sample, int(k))
        slot = {int(p): j for j, p in enumerate(index)}
        targets = (lab[0] != -100).nonzero().squeeze(1)
        rows = torch.tensor([slot[int(t) - 1] for t in targets])
        total = total + F.cross_entropy(logits[0, rows], lab[0, targets], reduction="sum")
        count += targets.numel()
    return total / count


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_grads_close(got, want, what):
    assert got.keys() == want.keys()
    for name in got:
        a, b = got[name], want[name]
        if a is None or b is None:
            assert (a is None or not bool(a.any())) and (b is None or not bool(b.any())), f"{what}: {name}"
            continue
        assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{what}: {n}: {m}")


def _training_specs(family):
    """The mixed samples with longer text, so that each has a few answer tokens after its image."""
    return [dict(spec, text_length=2 * spec["text_length"] + 4) for spec in mixed_specs(family)]


def _batch_with_labels(model, family):
    samples = singles(model, _training_specs(family))
    labels = [_labels(model, s) for s in samples]
    batch = collate(samples, "right")
    batch["labels"] = _collate_labels(labels, batch)
    return samples, labels, batch


@pytest.mark.parametrize("exits", ["fixed", "per_sample"])
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_training_loss_and_gradients_match_reference(family, exits):
    model = tiny_model(family)
    controller = vtw_train.attach(model)
    model.train()
    samples, labels, batch = _batch_with_labels(model, family)
    ks = torch.full((4,), L // 2) if exits == "fixed" else torch.tensor([2, 1, 0, 3])
    controller.exit_layer = int(ks[0]) if exits == "fixed" else ks

    loss, grads = _loss_and_grads(model, lambda: model(**batch, use_cache=False).loss)
    ref_loss, ref_grads = _loss_and_grads(model, lambda: _reference_loss(model, samples, labels, ks))
    assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    _assert_grads_close(grads, ref_grads, "engine vs reference")

    # Withdrawal changed the loss (the supervised tokens come after the image).
    controller.exit_layer = None
    with torch.no_grad():
        full_loss = model(**batch, use_cache=False).loss
    assert abs(float(full_loss) - float(loss)) > 1e-4

    # Gradients are finite and nonzero on every language-model parameter, and reach the vision
    # side (patch embedding, projector / merger) through the layers before K.
    for name, grad in grads.items():
        if name.startswith(VISION_PREFIXES):
            continue
        assert grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.any()), name
    vision = {n: g for n, g in grads.items() if n.startswith(VISION_PREFIXES)}
    patch = [g for n, g in vision.items() if "patch_embed" in n]
    projector = [g for n, g in vision.items() if "multi_modal_projector" in n or ".merger." in n]
    assert patch and projector
    for g in patch + projector:
        assert g is not None and bool(torch.isfinite(g).all()) and bool(g.any())


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_training_loss_from_reference_single_sample(family):
    """One unpadded sample without an attention mask (a packed-free training call): the loss equals
    the cross-entropy of the reference logits at the supervised positions."""
    model = tiny_model(family)
    controller = vtw_train.attach(model)
    model.train()
    sample = singles(model, [_training_specs(family)[1]])[0]
    labels = _labels(model, sample)
    for k in (0, L // 2):
        controller.exit_layer = k
        inputs = {key: v for key, v in sample.items() if key != "attention_mask"}
        loss = model(**inputs, labels=labels, use_cache=False).loss
        with torch.no_grad():
            ref = _reference_loss(model, [sample], [labels], [k])
        assert_close(loss.detach(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("exits", ["fixed", "per_sample"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_gradient_checkpointing_under_withdrawal(family, exits):
    model = tiny_model(family)
    controller = vtw_train.attach(model)
    model.train()
    _, _, batch = _batch_with_labels(model, family)
    controller.exit_layer = 2 if exits == "fixed" else torch.tensor([2, 1, 0, 3])

    # Count calls of a module inside each layer: transformers checkpoints the layer's forward, not
    # its __call__, so hooks on the layer itself do not see the recompute.
    calls = [0]
    handles = [
        layer.mlp.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        for layer in model.model.language_model.layers
    ]
    try:
        plain_loss, plain_grads = _loss_and_grads(model, lambda: model(**batch).loss)
        plain_calls, calls[0] = calls[0], 0
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert model.model.language_model.gradient_checkpointing
        ckpt_loss, ckpt_grads = _loss_and_grads(model, lambda: model(**batch).loss)
        ckpt_calls = calls[0]
    finally:
        for h in handles:
            h.remove()
    assert_close(ckpt_loss, plain_loss, atol=1e-6, rtol=1e-6)
    _assert_grads_close(ckpt_grads, plain_grads, "checkpointed vs plain")
    # Checkpointing really happened: every layer call ran again in backward.
    assert ckpt_calls == 2 * plain_calls, (ckpt_calls, plain_calls)
    assert torch.equal(
        controller.last_exit_layers, torch.tensor([2] * 4 if exits == "fixed" else [2, 1, 0, 3])
    )


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_peft_lora_on_language_model(family):
    model = tiny_model(family)
    samples = singles(model, mixed_specs(family))
    batch = collate(samples, "left")
    with torch.no_grad():
        base_logits = model(**batch).logits

    config = LoraConfig(target_modules=LORA_TARGETS, r=4, lora_alpha=8, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    base = peft_model.get_base_model()
    lora_names = [n for n, _ in base.named_parameters() if "lora_" in n]
    assert len(lora_names) == 2 * 2 * L  # A and B for q_proj and v_proj in every decoder layer
    assert all(".language_model.layers." in n for n in lora_names)
    assert not [n for n in lora_names if n.startswith(VISION_PREFIXES)], "LoRA leaked into the vision side"
    with torch.no_grad():
        peft_logits = peft_model(**batch).logits
    assert max_abs_diff(peft_logits, base_logits) > 1e-3, "LoRA (init_lora_weights=False) changed nothing"

    controller = vtw_train.attach(peft_model)
    assert vtw_train.attach(peft_model) is controller
    assert vtw_train.controller_of(peft_model) is controller
    with torch.no_grad():
        assert torch.equal(peft_model(**batch).logits, peft_logits)

    k = L // 2
    controller.exit_layer = k
    for sample in samples[:2]:
        index = text_positions(model, sample["input_ids"])
        with torch.no_grad():
            got = peft_model(**sample).logits[:, index]
        ref, ref_index = reference_logits(base, sample, k)  # the layers it calls include LoRA
        assert torch.equal(index, ref_index)
        assert_close(got, ref, atol=1e-5, rtol=1e-5)
        with peft_model.disable_adapter(), torch.no_grad():
            got_off = peft_model(**sample).logits[:, index]
            ref_off, _ = reference_logits(base, sample, k)
        assert_close(got_off, ref_off, atol=1e-5, rtol=1e-5)
        assert max_abs_diff(got, got_off) > 1e-3

    # The adapter switched off gives exactly the base model (the frozen teacher).
    controller.exit_layer = None
    with peft_model.disable_adapter(), torch.no_grad():
        assert torch.equal(peft_model(**batch).logits, base_logits)

    # Only the LoRA weights train when the base is frozen (peft's default).
    peft_model.train()
    controller.exit_layer = torch.tensor([2, 1, 0, 3])
    labels = _collate_labels([_labels(model, s) for s in samples], batch)
    peft_model(**batch, labels=labels, use_cache=False).loss.backward()
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and param.grad is not None, name
            assert bool(torch.isfinite(param.grad).all()) and bool(param.grad.any()), name
        else:
            assert not param.requires_grad and param.grad is None, name
