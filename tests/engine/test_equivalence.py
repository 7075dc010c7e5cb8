"""Forward-pass exactness of the withdrawal engine.

* no withdrawal (``exit_layer`` None or L) is bit-identical to the unpatched model, and ``detach()``
  gives the unpatched model back;
* withdrawal at K matches the hand-written reference loop (``tests/reference_loop.py``), which
  shares no masking or cache code with the engine, for every family and both attention backends;
* padded batches (left and right), different visual-token counts per sample and per-sample exits
  give every sample the logits it gets alone;
* per-sample exits save compute per sample: rows that have exited run as a text-only group.
"""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_LAYERS, max_abs_diff, mixed_specs, num_text_tokens, text_positions
from engine_helpers import collate, real_rows, singles
from reference_loop import reference_logits
from torch.testing import assert_close

import vtw_train
from vtw_train.tiny_models import FAMILIES, tiny_model

ATTNS = ("sdpa", "eager")
L = NUM_LAYERS
# Withdrawal at K < L must move the text logits after the image by far more than float noise.
MIN_EFFECT = 1e-3


def _stock_outputs(model, batch):
    """Logits without and with the cache, and a short cached greedy generation with its logits."""
    with torch.no_grad():
        no_cache = model(**batch, use_cache=False).logits
        with_cache = model(**batch, use_cache=True).logits
    gen = model.generate(
        **batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return no_cache, with_cache, gen.sequences, torch.stack(gen.logits)


def _assert_identical(got, want, what):
    names = ("no-cache logits", "cached logits", "generated ids", "generate logits")
    for name, a, b in zip(names, got, want, strict=True):
        assert torch.equal(a, b), f"{what}: {name} differ from the unpatched model"


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_no_withdrawal_is_bit_exact_and_detach_restores(family, attn):
    model = tiny_model(family, attn_implementation=attn)
    batch = collate(singles(model, mixed_specs(family)), "left")
    lm = model.model.language_model
    stock = _stock_outputs(model, batch)

    controller = vtw_train.attach(model)
    assert "forward" in lm.__dict__, "attach() did not replace the decoder forward"
    _assert_identical(_stock_outputs(model, batch), stock, "exit_layer=None")
    controller.exit_layer = L
    _assert_identical(_stock_outputs(model, batch), stock, "exit_layer=L")
    controller.exit_layer = torch.full((batch["input_ids"].shape[0],), L)
    _assert_identical(_stock_outputs(model, batch), stock, "exit_layer=[L, L, ...]")

    # The engine is live: withdrawal at K < L does change the logits...
    controller.exit_layer = L // 2
    with torch.no_grad():
        withdrawn = model(**batch).logits
    assert max_abs_diff(withdrawn, stock[0]) > MIN_EFFECT

    # ...and detach() (with a K < L still set) gives the unpatched model back.
    controller.detach()
    assert "forward" not in lm.__dict__
    assert lm.forward.__func__ is type(lm).forward
    assert vtw_train.controller_of(model) is None
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    _assert_identical(_stock_outputs(model, batch), stock, "after detach()")


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_withdrawal_matches_reference_loop(family, attn):
    model = tiny_model(family, attn_implementation=attn)
    controller = vtw_train.attach(model)
    specs = mixed_specs(family)
    samples = singles(model, [specs[0], specs[1]])  # one image; two images of different sizes
    for sample in samples:
        full, full_index = reference_logits(model, sample, None)
        with torch.no_grad():
            controller.exit_layer = None
            stock = model(**sample).logits
        # The reference itself agrees with the stock model when nothing is withdrawn.
        assert_close(stock[:, full_index], full, atol=1e-5, rtol=1e-5)
        for k in (0, 1, L // 2, L - 1, L):
            ref, index = reference_logits(model, sample, k)
            assert torch.equal(index, text_positions(model, sample["input_ids"]))
            controller.exit_layer = k
            with torch.no_grad():
                cached = model(**sample, use_cache=True).logits[:, index]
                uncached = model(**sample, use_cache=False).logits[:, index]
                # No padding mask and no cache: the text-phase mask must still be plain causal
                # (docs/engine.md, trap 3: gathered position ids look like packed sequences).
                no_mask = {key: v for key, v in sample.items() if key != "attention_mask"}
                unmasked = model(**no_mask, use_cache=False).logits[:, index]
            for name, got in (("cached", cached), ("uncached", uncached), ("no mask", unmasked)):
                assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=lambda m, n=name, kk=k: f"K={kk} {n}: {m}")
            if k < L:
                assert max_abs_diff(ref, full) > MIN_EFFECT, f"K={k}: the reference did not change"
                assert max_abs_diff(cached, full) > MIN_EFFECT, f"K={k}: the engine changed nothing"


def _check_rows_against_singles(model, controller, batch, samples, exits, logits):
    """Batched logits of every sample equal the sample alone (engine) and the reference loop."""
    for b, sample in enumerate(samples):
        k = int(exits[b])
        rows = real_rows(batch, b)
        got = logits[b, rows]
        controller.exit_layer = k
        with torch.no_grad():
            alone = model(**sample).logits[0]
        ref, index = reference_logits(model, sample, k)
        keep = torch.arange(rows.numel()) if k == L else index
        assert_close(got[keep], alone[keep], atol=2e-5, rtol=1e-5, msg=lambda m, b=b: f"row {b}: {m}")
        assert_close(got[index], ref[0], atol=2e-5, rtol=1e-5, msg=lambda m, b=b: f"row {b} vs ref: {m}")


@pytest.mark.parametrize("exits", ["fixed", "per_sample"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_matches_each_sample_alone(family, attn, padding_side, exits):
    model = tiny_model(family, attn_implementation=attn)
    controller = vtw_train.attach(model)
    samples = singles(model, mixed_specs(family))
    batch = collate(samples, padding_side)
    visual_counts = [s["input_ids"].shape[1] - num_text_tokens(model, s) for s in samples]
    assert len(set(visual_counts)) >= 3, f"samples should differ in visual tokens, got {visual_counts}"
    ks = torch.full((4,), L // 2) if exits == "fixed" else torch.tensor([2, 1, 0, L])
    controller.exit_layer = ks if exits == "per_sample" else int(ks[0])
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.equal(controller.last_exit_layers, ks)
    _check_rows_against_singles(model, controller, batch, samples, ks, logits)


def _count_layer_tokens(model):
    """Forward pre-hooks recording (rows, sequence length) of every call of every decoder layer."""
    calls: list[list[tuple[int, int]]] = [[] for _ in model.model.language_model.layers]
    handles = []
    for i, layer in enumerate(model.model.language_model.layers):

        def hook(module, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            calls[i].append((hidden.shape[0], hidden.shape[1]))

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


def _counted_forward(model, batch):
    calls, handles = _count_layer_tokens(model)
    try:
        with torch.no_grad():
            logits = model(**batch).logits
    finally:
        for h in handles:
            h.remove()
    return calls, logits


def _expected_calls(ks, text_counts, full_len, layer):
    """(rows, length) per group: rows with K > layer run the full stream; the others run the text
    stream, re-padded to the longest text among THEM (not among the whole batch)."""
    full = [b for b in range(len(ks)) if int(ks[b]) > layer]
    text = [b for b in range(len(ks)) if int(ks[b]) <= layer]
    calls = []
    if full:
        calls.append((len(full), full_len))
    if text:
        calls.append((len(text), max(text_counts[b] for b in text)))
    return sorted(calls)


@pytest.mark.parametrize("longest_text", ["exiting_row", "staying_row"])
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_per_sample_exits_save_compute_per_sample(family, longest_text):
    """Rows that exit early must stop paying for visual tokens at their own K, not at the batch's
    largest K: forward pre-hooks count (rows, length) of every decoder-layer call. With exits
    [1, L] on a batch of two, layers >= 1 process full length + the exiting sample's text length,
    not 2 x full length. ``longest_text`` says which row has more text tokens: when it is the row
    that stays full, the text group must not be padded to that row's text length."""
    model = tiny_model(family)
    controller = vtw_train.attach(model)
    specs = mixed_specs(family)
    long_a, long_b = (14, specs[1]["text_length"]) if longest_text == "exiting_row" else (4, 20)
    samples = singles(model, [dict(specs[0], text_length=long_a), dict(specs[1], text_length=long_b)])
    batch = collate(samples, "left")
    full_len = batch["input_ids"].shape[1]
    counts = [num_text_tokens(model, s) for s in samples]
    assert (counts[0] > counts[1]) == (longest_text == "exiting_row")

    ks = torch.tensor([1, L])
    controller.exit_layer = ks
    calls, logits = _counted_forward(model, batch)
    assert calls[0] == [(2, full_len)]
    for layer in range(1, L):
        assert sorted(calls[layer]) == [(1, counts[0]), (1, full_len)], f"layer {layer}: {calls[layer]}"
        assert sum(r * t for r, t in calls[layer]) == full_len + counts[0] < 2 * full_len
    _check_rows_against_singles(model, controller, batch, samples, ks, logits)

    # Three exit groups over a batch of three: [0, 2, L]. The K = L row has the most text in the
    # "staying_row" variant, the K = 0 row in the other.
    text3 = [14, specs[1]["text_length"], 4] if longest_text == "exiting_row" else [4, 5, 20]
    samples3 = singles(
        model,
        [dict(spec, text_length=n) for spec, n in zip((specs[0], specs[1], specs[3]), text3, strict=True)],
    )
    batch3 = collate(samples3, "left")
    full3 = batch3["input_ids"].shape[1]
    counts3 = [num_text_tokens(model, s) for s in samples3]
    ks3 = torch.tensor([0, 2, L])
    controller.exit_layer = ks3
    calls, logits3 = _counted_forward(model, batch3)
    for layer in range(L):
        expected = _expected_calls(ks3, counts3, full3, layer)
        assert sorted(calls[layer]) == expected, f"layer {layer}: {calls[layer]} (text counts {counts3})"
    _check_rows_against_singles(model, controller, batch3, samples3, ks3, logits3)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_inputs_embeds_and_manual_cached_decode(family):
    """Two ways of calling the model that bypass ``generate()``: ``inputs_embeds`` instead of
    ``input_ids`` (visual positions found from the embeddings), and a hand-written decode loop
    that passes ``past_key_values`` back in. (Qwen2-VL needs ``input_ids`` for its M-RoPE positions
    in the stock model too, so it is not part of this test.)"""
    model = tiny_model(family)
    controller = vtw_train.attach(model)
    sample = singles(model, [mixed_specs(family)[1]])[0]
    index = text_positions(model, sample["input_ids"])
    k = L // 2
    controller.exit_layer = k
    with torch.no_grad():
        by_ids = model(**sample).logits[:, index]
        embeds = model.get_input_embeddings()(sample["input_ids"])
        rest = {key: v for key, v in sample.items() if key != "input_ids"}
        controller.last_exit_layers = None
        by_embeds = model(inputs_embeds=embeds, **rest).logits[:, index]
    assert torch.equal(controller.last_exit_layers, torch.tensor([k])), "inputs_embeds did not withdraw"
    assert_close(by_embeds, by_ids, atol=1e-6, rtol=1e-6)

    tokens = [40, 41, 42]
    current = dict(sample)
    with torch.no_grad():
        out = model(**sample, use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, vtw_train.WithdrawalCache)
        for token in tokens:
            ids = torch.tensor([[token]])
            current = {
                "input_ids": torch.cat([current["input_ids"], ids], 1),
                "attention_mask": torch.cat([current["attention_mask"], torch.ones_like(ids)], 1),
                **{key: v for key, v in sample.items() if key not in ("input_ids", "attention_mask")},
            }
            step = model(
                input_ids=ids, attention_mask=current["attention_mask"], past_key_values=cache, use_cache=True
            ).logits[0, -1]
            ref, _ = reference_logits(model, current, k)
            assert_close(step, ref[0, -1], atol=2e-5, rtol=1e-5)
    assert cache.get_seq_length() == current["input_ids"].shape[1]
