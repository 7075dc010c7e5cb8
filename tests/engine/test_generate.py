"""``generate()`` under withdrawal: the KV cache of layers >= K holds text only, and cached
decoding (greedy, sampling, beam search) must equal the cache-free reference loop and, batched,
each sample generated alone."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import NUM_LAYERS, max_abs_diff, mixed_specs, num_text_tokens
from engine_helpers import collate, singles
from reference_loop import reference_greedy, reference_logits, with_tokens
from torch.testing import assert_close

import vtw_train
from vtw_train.tiny_models import (
    EOS_TOKEN_ID,
    FAMILIES,
    PAD_TOKEN_ID,
    VOCAB_SIZE,
    tiny_model,
    visual_token_mask,
)

L = NUM_LAYERS
NEW = 6


def _prompt_len(inputs) -> int:
    return inputs["input_ids"].shape[1]


def _new_tokens(sequences, inputs):
    return sequences[:, _prompt_len(inputs) :]


def _assert_same_continuation(batched_row: torch.Tensor, alone: torch.Tensor, what: str) -> None:
    """A batched row equals the sample generated alone; after EOS the batched row holds padding
    only (the sample alone stops there)."""
    n = alone.numel()
    assert batched_row[:n].tolist() == alone.tolist(), f"{what}: {batched_row.tolist()} vs {alone.tolist()}"
    rest = batched_row[n:]
    if rest.numel():
        assert alone[-1].item() == EOS_TOKEN_ID, f"{what}: the sample alone stopped early without EOS"
        assert bool((rest == PAD_TOKEN_ID).all()), f"{what}: tokens after EOS: {rest.tolist()}"


GREEDY_CASES = [(f, "sdpa", k) for f in FAMILIES for k in (0, 1, L - 1)] + [
    (f, "eager", L // 2) for f in ("llava", "llava_next", "qwen2_vl")
]


@pytest.mark.parametrize(("family", "attn", "k"), GREEDY_CASES)
def test_cached_greedy_matches_reference(family, attn, k):
    """Cached decoding after a withdrawn prefill = the cache-free reference: same tokens, and the
    logits of every step equal the reference's at that position."""
    model = tiny_model(family, attn_implementation=attn)
    controller = vtw_train.attach(model)
    sample = singles(model, [mixed_specs(family)[1]])[0]  # two images
    controller.exit_layer = k
    out = model.generate(
        **sample, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    assert torch.equal(controller.last_exit_layers, torch.tensor([k])), "generate() did not withdraw"
    new = _new_tokens(out.sequences, sample)[0]
    ref = reference_greedy(model, sample, k, NEW)[0]
    assert new.tolist() == ref.tolist()
    assert not bool(visual_token_mask(model, new).any())

    # All step logits at once: the reference on prompt + generated tokens (minus the last) predicts
    # the generated tokens at its last n positions.
    n = new.numel()
    ref_logits, _ = reference_logits(model, with_tokens(sample, new[:-1]), k)
    got = torch.stack(out.logits)[:, 0]  # [n, vocab]
    assert_close(got, ref_logits[0, -n:], atol=2e-5, rtol=1e-5)

    if k < L:  # a prefill that silently skipped withdrawal would fail here
        full_logits, _ = reference_logits(model, sample, None)
        assert max_abs_diff(got[0], full_logits[0, -1]) > 1e-3


BATCHED_CASES = [(f, "sdpa", e) for f in FAMILIES for e in ("K=0", "K=2", "per_sample")] + [
    (f, "eager", "per_sample") for f in FAMILIES
]


@pytest.mark.parametrize(("family", "attn", "exits"), BATCHED_CASES)
def test_batched_greedy_matches_each_sample_alone(family, attn, exits):
    """Left-padded batch, different visual-token counts per sample (multi-image, anyres sizes,
    Qwen grids, a sample without images): every row equals the sample generated alone."""
    model = tiny_model(family, attn_implementation=attn)
    controller = vtw_train.attach(model)
    samples = singles(model, mixed_specs(family))
    batch = collate(samples, "left")
    if exits == "per_sample":
        ks = torch.tensor([2, 1, 0, L])
        controller.exit_layer = ks
    else:
        controller.exit_layer = int(exits[2:])
        ks = torch.full((4,), controller.exit_layer)
    batched = _new_tokens(model.generate(**batch, max_new_tokens=NEW, do_sample=False), batch)
    assert torch.equal(controller.last_exit_layers, ks)
    for b, sample in enumerate(samples):
        controller.exit_layer = int(ks[b])
        alone = _new_tokens(model.generate(**sample, max_new_tokens=NEW, do_sample=False), sample)[0]
        _assert_same_continuation(batched[b], alone, f"row {b} (K={int(ks[b])})")


def _reference_beam_score(model, sample, new: torch.Tensor, k: int) -> float:
    """Beam score of a finished hypothesis as transformers defines it: the sum of the log-softmax of
    the raw logits at the chosen tokens, divided by the generated length (length_penalty 1)."""
    new = new[new != PAD_TOKEN_ID]
    logits, _ = reference_logits(model, with_tokens(sample, new[:-1]), k)
    logprobs = torch.log_softmax(logits[0, -new.numel() :], dim=-1)
    return float(logprobs.gather(1, new.view(-1, 1)).sum() / new.numel())


@pytest.mark.parametrize("exits", ["fixed", "per_sample"])
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_beam_search_batched_matches_per_sample(family, exits):
    model = tiny_model(family)
    assert model.generation_config.length_penalty in (None, 1.0)
    controller = vtw_train.attach(model)
    samples = singles(model, mixed_specs(family)[:3])
    batch = collate(samples, "left")
    ks = torch.full((3,), 1) if exits == "fixed" else torch.tensor([1, 2, 0])
    kwargs = dict(
        max_new_tokens=5,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    controller.exit_layer = 1 if exits == "fixed" else ks
    batched = model.generate(**batch, **kwargs)
    new_b = _new_tokens(batched.sequences, batch)
    assert new_b.shape[0] == 6
    for b, sample in enumerate(samples):
        k = int(ks[b])
        controller.exit_layer = k
        alone = model.generate(**sample, **kwargs)
        new_a = _new_tokens(alone.sequences, sample)
        for j in range(2):
            _assert_same_continuation(
                new_b[2 * b + j], new_a[j][new_a[j] != PAD_TOKEN_ID], f"row {b} beam {j}"
            )
            # The score of each returned hypothesis is the reference model's score of that sequence.
            ref_score = _reference_beam_score(model, sample, new_a[j], k)
            assert abs(float(alone.sequences_scores[j]) - ref_score) < 1e-4
            assert abs(float(batched.sequences_scores[2 * b + j]) - ref_score) < 1e-4


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_sampling_under_withdrawal(family):
    model = tiny_model(family)
    controller = vtw_train.attach(model)
    samples = singles(model, mixed_specs(family))
    batch = collate(samples, "left")
    controller.exit_layer = 1

    greedy = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
    top1 = model.generate(**batch, max_new_tokens=NEW, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)

    def sample_with_seed(seed, inputs, **kw):
        torch.manual_seed(seed)
        return model.generate(**inputs, max_new_tokens=NEW, do_sample=True, top_k=0, temperature=1.5, **kw)

    first = sample_with_seed(1, batch)
    assert torch.equal(first, sample_with_seed(1, batch)), "sampling with a fixed seed is not reproducible"
    new = _new_tokens(first, batch)
    assert bool(((new >= 0) & (new < VOCAB_SIZE)).all())
    assert not bool(visual_token_mask(model, new).any())
    assert not bool((new == PAD_TOKEN_ID).all(dim=1).any())
    seeds = [sample_with_seed(s, batch) for s in (2, 3, 4)]
    assert any(not torch.equal(first, other) for other in seeds), "do_sample ignored the random state"
    assert not all(torch.equal(other, greedy) for other in [first, *seeds]), "do_sample decoded greedily"

    # Batch of one: the cached run and the cache-free run (prefix recomputed every step, withdrawn
    # every time) draw the same tokens from the same seed.
    sample = samples[1]
    cached = sample_with_seed(5, sample)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uncached = sample_with_seed(5, sample, use_cache=False)
    assert torch.equal(cached, uncached)


def _layer_lengths(cache) -> list[int]:
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def _layer_bytes(cache) -> list[int]:
    return [
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
    ]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_cache_holds_text_only_after_exit(family):
    model = tiny_model(family)
    controller = vtw_train.attach(model)
    samples = singles(model, mixed_specs(family))
    batch = collate(samples, "left")
    full_len = _prompt_len(batch)
    text_counts = [num_text_tokens(model, s) for s in samples]
    text_len = max(text_counts)
    assert text_len < full_len

    with torch.no_grad():
        stock_cache = model(**batch, use_cache=True).past_key_values
    assert _layer_lengths(stock_cache) == [full_len] * L
    stock_bytes = _layer_bytes(stock_cache)

    for k in (0, L // 2):
        controller.exit_layer = k
        with torch.no_grad():
            cache = model(**batch, use_cache=True).past_key_values
        assert _layer_lengths(cache) == [full_len] * k + [text_len] * (L - k)
        assert cache.get_seq_length() == full_len, "the full-stream length must survive withdrawal"
        layer_bytes = _layer_bytes(cache)
        assert layer_bytes[:k] == stock_bytes[:k]
        assert all(
            a * full_len == b * text_len for a, b in zip(layer_bytes[k:], stock_bytes[k:], strict=True)
        )
        assert sum(layer_bytes) < sum(stock_bytes)

        # Each sample's text keys/values sit left-padded in the text layers, as they do alone.
        # (Keys carry RoPE of positions that left padding shifts in a plain forward; the rotation
        # keeps each key's norm, so compare values exactly and key norms.)
        for b, sample in enumerate(samples):
            with torch.no_grad():
                alone = model(**sample, use_cache=True).past_key_values
            n = text_counts[b]
            for i in range(k, L):
                got, want = cache.layers[i], alone.layers[i]
                assert_close(got.values[b, :, -n:], want.values[0], atol=1e-5, rtol=1e-5)
                assert_close(
                    got.keys[b, :, -n:].norm(dim=-1), want.keys[0].norm(dim=-1), atol=1e-5, rtol=1e-5
                )

        # After generate(): n new tokens, n - 1 of them fed back through the cache.
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        n_new = out.sequences.shape[1] - full_len
        cache = out.past_key_values
        assert _layer_lengths(cache) == [full_len + n_new - 1] * k + [text_len + n_new - 1] * (L - k)
        assert cache.get_seq_length() == full_len + n_new - 1
