"""The reference loop is the oracle for the withdrawal engine, so it is itself checked against
independent computations: the stock forward (no withdrawal), a text-only run of the stock
language model (withdrawal before layer 0), causality (tokens before the first image can never
see it), and stock greedy ``generate``."""

from __future__ import annotations

import pytest
import torch
from reference_loop import position_ids_for, reference_greedy, reference_logits
from torch.testing import assert_close

from vtw_train.tiny_models import FAMILIES, tiny_inputs, tiny_model, visual_token_mask

LLAVA_LIKE = ("llava", "llava-mistral", "llava-qwen2", "llava_next")
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Millisecond-sized ops are 10-50x slower with intra-op threads on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sample(model, *, images: int = 2, text: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    return tiny_inputs(model, 1, images_per_sample=[images], text_lengths=[text], seed=seed)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_no_withdrawal_equals_stock_forward(family: str, attn: str) -> None:
    model = tiny_model(family, attn_implementation=attn)
    inputs = _sample(model)
    with torch.no_grad():
        stock = model(**inputs).logits
    num_layers = model.config.get_text_config().num_hidden_layers
    text = ~visual_token_mask(model, inputs["input_ids"][0])
    for exit_layer in (None, num_layers):
        logits, index = reference_logits(model, inputs, exit_layer)
        assert torch.equal(index, torch.nonzero(text).flatten())
        assert logits.shape == (1, int(text.sum()), model.config.get_text_config().vocab_size)
        assert_close(logits, stock[:, index], **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_prompt_is_unaffected_by_exit_layer(family: str) -> None:
    model = tiny_model(family)
    inputs = _sample(model, images=0)
    with torch.no_grad():
        stock = model(**inputs).logits
    for exit_layer in (0, 2, None):
        logits, index = reference_logits(model, inputs, exit_layer)
        assert index.numel() == inputs["input_ids"].shape[1]
        assert_close(logits, stock, **TOL)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_exit_at_zero_equals_text_only_run_with_original_positions(family: str, attn: str) -> None:
    """Withdrawal before layer 0 means the decoder never sees a visual token: the stock language
    model run on the text tokens alone, at their original positions, must give the same logits.
    This path shares no code with the reference's gather (stock masks, stock decoder loop)."""
    model = tiny_model(family, attn_implementation=attn)
    inputs = _sample(model)
    logits, index = reference_logits(model, inputs, 0)
    ids = inputs["input_ids"][:, index]
    positions = position_ids_for(model, inputs)[..., index]
    language_model = model.model.language_model
    with torch.no_grad():
        # An explicit all-ones mask: with no mask and no cache, transformers reads the gapped
        # positions as packed sequences and builds a block-diagonal mask (engine notes, trap 3).
        hidden = language_model(
            input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids), use_cache=False
        ).last_hidden_state
        expected = model.lm_head(hidden)
        compacted = model.lm_head(language_model(input_ids=ids, use_cache=False).last_hidden_state)
    assert_close(logits, expected, **TOL)
    # The check is sensitive to positions: renumbering the survivors 0..n-1 changes the logits.
    assert (compacted - expected).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_withdrawal_is_causal_and_changes_later_logits(family: str) -> None:
    """Tokens before the first image never attend to it, so their logits cannot depend on the exit
    layer; tokens after it must (otherwise the tiny models could not catch a wrong engine)."""
    model = tiny_model(family)
    inputs = _sample(model, text=12)
    full, index = reference_logits(model, inputs, None)
    visual = visual_token_mask(model, inputs["input_ids"][0])
    before = index < int(torch.nonzero(visual)[0])
    assert 0 < int(before.sum()) < index.numel()
    previous = full
    num_layers = len(model.model.language_model.layers)
    for exit_layer in range(num_layers - 1, -1, -1):
        logits, same_index = reference_logits(model, inputs, exit_layer)
        assert torch.equal(same_index, index)
        assert_close(logits[:, before], full[:, before], **TOL)
        assert (logits[:, ~before] - full[:, ~before]).abs().max() > 1e-3
        assert (logits - previous).abs().max() > 1e-4, "every exit layer should give different logits"
        previous = logits


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_without_withdrawal_equals_stock_generate(family: str) -> None:
    model = tiny_model(family)
    inputs = _sample(model, text=7, seed=2)
    stock = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    ours = reference_greedy(model, inputs, None, 5)
    assert torch.equal(ours, stock)
    withdrawn = reference_greedy(model, inputs, 1, 5)
    assert withdrawn.shape[0] == 1 and 1 <= withdrawn.shape[1] <= 5


def test_reference_rejects_what_it_cannot_check() -> None:
    model = tiny_model("llava")
    batch = tiny_inputs(model, 2)
    with pytest.raises(ValueError, match="batch 1"):
        reference_logits(model, batch, 2)
    padded = {k: v[:1] for k, v in batch.items() if k != "pixel_values"}
    padded["attention_mask"] = padded["attention_mask"].clone()
    padded["attention_mask"][0, 0] = 0
    with pytest.raises(ValueError, match="unpadded"):
        reference_logits(model, padded, 2)
    with pytest.raises(ValueError, match="exit_layer"):
        reference_logits(model, _sample(model), 5)


def test_reference_sees_lora_adapters_through_peft_wrapper() -> None:
    """Training checks run the reference on the deployed student (base + LoRA)."""
    peft = pytest.importorskip("peft")
    model = tiny_model("llava")
    inputs = _sample(model)
    base, _ = reference_logits(model, inputs, None)
    config = peft.LoraConfig(
        r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False
    )
    student = peft.get_peft_model(model, config)
    with torch.no_grad():
        stock = student(**inputs).logits
    logits, index = reference_logits(student, inputs, None)
    assert_close(logits, stock[:, index], **TOL)
    assert (logits - base).abs().max() > 1e-3
    with student.disable_adapter():
        assert_close(reference_logits(student, inputs, None)[0], base, **TOL)
