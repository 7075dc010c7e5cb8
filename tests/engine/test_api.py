"""The controller's contract: attach/detach, validation of ``exit_layer`` with messages that say what
is valid, clear errors for unsupported models and inputs, ``using`` and ``last_exit_layers``."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import NUM_LAYERS, max_abs_diff, mixed_specs, text_positions
from engine_helpers import collate, singles
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

import vtw_train
from vtw_train import UnsupportedModelError, WithdrawalError
from vtw_train.tiny_models import tiny_model

L = NUM_LAYERS
VALID_RANGE = re.escape(f"[0, {L}]")


def _model_and_batch(family="llava", n=2):
    model = tiny_model(family)
    samples = singles(model, mixed_specs(family)[:n])
    return model, samples, collate(samples, "left")


def test_attach_is_idempotent_and_detach_is_clean():
    model, _, batch = _model_and_batch()
    controller = vtw_train.attach(model)
    assert isinstance(controller, vtw_train.ExitController)
    assert vtw_train.attach(model) is controller
    assert vtw_train.controller_of(model) is controller
    assert controller.num_layers == L
    assert controller.exit_layer is None

    controller.detach()
    controller.detach()  # a second detach is a no-op
    assert not controller.attached
    assert vtw_train.controller_of(model) is None
    again = vtw_train.attach(model)
    assert again is not controller and again.attached
    again.exit_layer = 1
    with torch.no_grad():
        withdrawn = model(**batch).logits
    assert torch.equal(again.last_exit_layers, torch.tensor([1, 1]))
    again.detach()
    with torch.no_grad():
        assert max_abs_diff(model(**batch).logits, withdrawn) > 1e-3


def test_supported_classes():
    assert set(vtw_train.supported_model_classes()) == {
        "LlavaForConditionalGeneration",
        "LlavaNextForConditionalGeneration",
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
    }


@pytest.mark.parametrize(
    "value",
    [
        -1,
        L + 1,
        1.5,
        float(L),
        True,
        "2",
        torch.tensor([[1, 2]]),
        torch.tensor([0.0, 1.0]),
        torch.tensor([0, L + 1]),
        torch.tensor([-1, 0]),
    ],
    ids=[
        "neg",
        "L+1",
        "float",
        "float-int",
        "bool",
        "str",
        "2d-tensor",
        "float-tensor",
        "big-entry",
        "neg-entry",
    ],
)
def test_invalid_exit_layer_names_the_valid_range(value):
    model = tiny_model("llava")
    controller = vtw_train.attach(model)
    controller.exit_layer = 2
    with pytest.raises(ValueError, match=VALID_RANGE) as info:
        controller.exit_layer = value
    assert isinstance(info.value, WithdrawalError)
    assert controller.exit_layer == 2, "a rejected value must leave the previous setting in place"


@pytest.mark.parametrize(
    "value",
    [0, L, torch.tensor([0, L]), torch.tensor([1, 2], dtype=torch.int32)],
    ids=["0", "L", "int64-tensor", "int32-tensor"],
)
def test_valid_exit_layers_are_accepted(value):
    if isinstance(value, torch.Tensor):
        value = value.clone()  # the parameter object is shared; this test edits its copy
    controller = vtw_train.attach(tiny_model("llava"))
    controller.exit_layer = value
    if isinstance(value, torch.Tensor):
        assert controller.exit_layer.dtype == torch.long
        assert torch.equal(controller.exit_layer, value.long())
        # The validated setting is a snapshot: editing the caller's tensor afterwards (say, to an
        # out-of-range value) must not change it behind the validation's back.
        expected = value.long().clone()
        value[0] = L + 5
        assert torch.equal(controller.exit_layer, expected)
    else:
        assert controller.exit_layer == value


def test_unsupported_model_is_rejected_by_name():
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    with pytest.raises(UnsupportedModelError) as info:
        vtw_train.attach(model)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "LlamaForCausalLM" in message
    for name in vtw_train.supported_model_classes():
        assert name in message
    assert "forward" not in model.model.__dict__, "a rejected model must be left untouched"


def test_single_entry_exit_tensor_broadcasts_like_an_int():
    model, _, batch = _model_and_batch(n=2)
    controller = vtw_train.attach(model)
    controller.exit_layer = torch.tensor([1])
    with torch.no_grad():
        got = model(**batch).logits
        controller.exit_layer = 1
        assert torch.equal(got, model(**batch).logits)


@pytest.mark.parametrize(("n_exits", "batch_size"), [(3, 2), (2, 3), (2, 4)])
def test_per_sample_exits_must_match_the_batch(n_exits, batch_size):
    """A per-sample tensor whose length is not the batch size is an error that names both counts,
    in a plain forward. (2 for a batch of 4 included: it divides the batch, but a plain forward has
    no beams to expand, so interleaving the two values over four samples would be silent misuse.)"""
    model, _, batch = _model_and_batch(n=batch_size)
    controller = vtw_train.attach(model)
    controller.exit_layer = torch.tensor([1, 2, 3][:n_exits])
    with (
        pytest.raises(ValueError, match=rf"{n_exits} entries.*{batch_size} samples") as info,
        torch.no_grad(),
    ):
        model(**batch)
    assert isinstance(info.value, WithdrawalError)


def test_per_sample_exits_mismatch_in_generate():
    model, _, batch = _model_and_batch(n=3)
    controller = vtw_train.attach(model)
    controller.exit_layer = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"2 entries.*3 samples"):
        model.generate(**batch, max_new_tokens=2, do_sample=False)


def test_output_hidden_states_only_without_withdrawal():
    model, _, batch = _model_and_batch()
    controller = vtw_train.attach(model)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == L + 1
    controller.exit_layer = 2
    with pytest.raises(ValueError, match=r"output_hidden_states.*exit_layer = None") as info, torch.no_grad():
        model(**batch, output_hidden_states=True)
    assert isinstance(info.value, WithdrawalError)
    # K = L withdraws nothing, so hidden states are available there too.
    controller.exit_layer = L
    with torch.no_grad():
        out_l = model(**batch, output_hidden_states=True)
    for a, b in zip(out_l.hidden_states, out.hidden_states, strict=True):
        assert torch.equal(a, b)


def test_using_restores_the_previous_reduction():
    model, samples, batch = _model_and_batch()
    controller = vtw_train.attach(model)
    sample = samples[0]
    index = text_positions(model, sample["input_ids"])
    with torch.no_grad():
        controller.exit_layer = 3
        at_three = model(**sample).logits[:, index]
        controller.exit_layer = 1
        at_one = model(**sample).logits[:, index]
        assert max_abs_diff(at_one, at_three) > 1e-3

        with controller.using(exit_layer=3) as ctl:
            assert ctl is controller and controller.exit_layer == 3
            assert_close(model(**sample).logits[:, index], at_three, atol=0, rtol=0)
        assert controller.exit_layer == 1
        assert_close(model(**sample).logits[:, index], at_one, atol=0, rtol=0)

        per_sample = torch.tensor([0, L])
        with controller.using(exit_layer=per_sample):
            model(**batch)
            assert torch.equal(controller.last_exit_layers, per_sample)
        assert controller.exit_layer == 1

        with pytest.raises(RuntimeError, match="boom"), controller.using():
            assert controller.exit_layer is None
            raise RuntimeError("boom")
        assert controller.exit_layer == 1

        with pytest.raises(ValueError, match=VALID_RANGE), controller.using(exit_layer=L + 1):
            pass
        assert controller.exit_layer == 1


def test_last_exit_layers_are_recorded():
    model, _, batch = _model_and_batch(n=3)
    controller = vtw_train.attach(model)
    assert controller.last_exit_layers is None
    controller.exit_layer = 2
    with torch.no_grad():
        model(**batch)
    assert torch.equal(controller.last_exit_layers, torch.tensor([2, 2, 2]))
    ks = torch.tensor([0, 3, 1])
    controller.exit_layer = ks
    model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert torch.equal(controller.last_exit_layers, ks)
    ks[0] = 2  # the record is a copy, not a view of the caller's tensor
    assert controller.last_exit_layers.tolist() == [0, 3, 1]
    # K = L withdraws nothing and runs the stock forward, but K per sample is still on record.
    controller.exit_layer = L
    with torch.no_grad():
        model(**batch)
    assert controller.last_exit_layers.tolist() == [L] * 3
    controller.reduction = None  # the full model: no exit on record
    with torch.no_grad():
        model(**batch)
    assert controller.last_exit_layers is None


def test_text_only_inputs_and_logits_to_keep():
    """A batch without visual tokens is untouched by an exit setting, and ``logits_to_keep`` keeps
    its contract under withdrawal."""
    model, _, batch = _model_and_batch(n=4)
    text_only = singles(model, [dict(images=0, text_length=6), dict(images=0, text_length=9)])
    text_batch = collate(text_only, "left")
    with torch.no_grad():
        stock = model(**text_batch).logits
        controller = vtw_train.attach(model)
        controller.exit_layer = 0
        assert torch.equal(model(**text_batch).logits, stock)

        controller.exit_layer = torch.tensor([2, 1, 0, L])
        full = model(**batch).logits
        last = model(**batch, logits_to_keep=1).logits
    assert last.shape[1] == 1
    assert torch.equal(last, full[:, -1:])
