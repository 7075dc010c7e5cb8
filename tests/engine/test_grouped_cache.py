"""Per-sample exits: in a layer where some samples have exited and others not, the cache holds one
group of rows per layout, so each sample keeps what it needs at its own exit; decoding on that cache
equals the cache-free reference, through cropping and row selection, and builds masks per distinct
group, not per layer."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_LAYERS, mixed_specs, num_text_tokens
from engine_helpers import collate, singles
from reference_loop import reference_logits, with_tokens
from torch.testing import assert_close

import vtw_train
import vtw_train.engine.grouped as grouped
from vtw_train.engine.cache import kv_bytes
from vtw_train.engine.grouped import GroupedLayer
from vtw_train.evaluation.profiling import cache_bytes
from vtw_train.tiny_models import EOS_TOKEN_ID, PAD_TOKEN_ID, tiny_model

L = NUM_LAYERS
EXITS = [2, 1, 0, L]  # the third sample has no image; the fourth never exits


def _layer_bytes(layer) -> int:
    if isinstance(layer, GroupedLayer):
        return layer.nbytes()
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))


def _mixed_prefill(family: str, exits=EXITS):
    model = tiny_model(family)
    controller = vtw_train.attach(model)
    samples = singles(model, mixed_specs(family))
    batch = collate(samples, "left")
    controller.exit_layer = torch.tensor(exits)
    with torch.no_grad():
        cache = model(**batch, use_cache=True).past_key_values
    return model, controller, samples, batch, cache


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_cache_bytes_are_each_samples_own_need(family):
    """Layer by layer: rows still reading visual tokens hold the full prompt, exited rows hold their
    group's longest text. Nothing else: no exited sample's visual slots are kept."""
    model, _, samples, batch, cache = _mixed_prefill(family)
    full_len = batch["input_ids"].shape[1]
    text = [num_text_tokens(model, s) for s in samples]
    vtw_train.attach(model).exit_layer = L  # every sample keeps its visual tokens: the stock cache
    with torch.no_grad():
        stock_cache = model(**batch, use_cache=True).past_key_values
    per_token = _layer_bytes(stock_cache.layers[0]) // (len(samples) * full_len)

    total_mixed = 0
    for layer_idx, layer in enumerate(cache.layers):
        full_rows = [b for b, k in enumerate(EXITS) if k > layer_idx]
        text_rows = [b for b, k in enumerate(EXITS) if k <= layer_idx]
        if text_rows and full_rows:
            assert isinstance(layer, GroupedLayer)
            assert [g.rows for g in layer.groups] == [full_rows, text_rows]
            expected = len(full_rows) * full_len + len(text_rows) * max(text[b] for b in text_rows)
            total_mixed += 1
        elif full_rows:
            expected = len(samples) * full_len
        else:
            expected = len(samples) * max(text)
        assert _layer_bytes(layer) == expected * per_token, f"layer {layer_idx}"
    assert total_mixed == L  # the last sample never exits, the third exits at 0: every layer is mixed
    assert kv_bytes(cache) == cache_bytes(cache) == sum(_layer_bytes(layer) for layer in cache.layers)
    assert kv_bytes(cache) < kv_bytes(stock_cache)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_each_group_holds_what_the_sample_holds_alone(family):
    """The values kept for a row in a mixed layer are the ones that sample keeps alone at its own K:
    full-layout rows their whole prompt, exited rows their text (left-padded to the group)."""
    model, controller, samples, _, cache = _mixed_prefill(family)
    for layer_idx in (0, 1):
        layer = cache.layers[layer_idx]
        for group in layer.groups:
            for pos, b in enumerate(group.rows):
                controller.exit_layer = EXITS[b]
                with torch.no_grad():
                    alone = model(**samples[b], use_cache=True).past_key_values.layers[layer_idx]
                n = alone.values.shape[-2]
                assert_close(group.values[pos, :, -n:], alone.values[0], atol=1e-5, rtol=1e-5)


def _decode_step(model, cache, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[
            :, -1
        ]
    return logits, mask


def test_decode_after_a_mixed_prefill_equals_the_cache_free_reference_through_crop_and_select():
    model, _, samples, batch, cache = _mixed_prefill("llava")
    tokens = torch.tensor([[40, 41], [42, 43], [44, 45], [46, 47]])
    mask = batch["attention_mask"]
    steps = []
    for step in range(2):
        logits, mask = _decode_step(model, cache, tokens[:, step : step + 1], mask)
        steps.append(logits)
        for b, sample in enumerate(samples):
            ref, _ = reference_logits(model, with_tokens(sample, tokens[b, : step + 1]), EXITS[b])
            assert_close(logits[b], ref[0, -1], atol=2e-5, rtol=1e-5)

    # Crop the last token and feed it again: the same logits as before.
    lengths = [[g.keys.shape[-2] for g in layer.groups] for layer in cache.layers[:2]]
    cache.crop(-1)
    assert [[g.keys.shape[-2] for g in layer.groups] for layer in cache.layers[:2]] == [
        [n - 1 for n in row] for row in lengths
    ]
    again, mask = _decode_step(model, cache, tokens[:, 1:2], mask[:, :-1])
    assert_close(again, steps[1], atol=1e-6, rtol=1e-6)

    # Keep rows 3 and 1 (in that order): groups follow, and decoding continues per sample.
    cache.batch_select_indices(torch.tensor([3, 1]))
    layer0 = cache.layers[0]
    assert isinstance(layer0, GroupedLayer) and [g.rows for g in layer0.groups] == [[0, 1]]
    layer1 = cache.layers[1]
    assert [g.rows for g in layer1.groups] == [[0], [1]]
    nxt = torch.tensor([[50], [51]])
    logits, _ = _decode_step(model, cache, nxt, mask[[3, 1]])
    for row, b in enumerate((3, 1)):
        seq = torch.cat([tokens[b], nxt[row]])
        ref, _ = reference_logits(model, with_tokens(samples[b], seq), EXITS[b])
        assert_close(logits[row], ref[0, -1], atol=2e-5, rtol=1e-5)

    cache.reset()
    assert not any(isinstance(layer, GroupedLayer) for layer in cache.layers)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_batched_generate_logits_equal_the_reference_per_sample(family):
    """``generate`` on a batch with spread exits: every step's logits of every row are the cache-free
    reference's for that sample at its own K (until the row ends)."""
    exits = [3, 1, 2, 0]
    model = tiny_model(family)
    controller = vtw_train.attach(model)
    samples = singles(model, mixed_specs(family))
    batch = collate(samples, "left")
    controller.exit_layer = torch.tensor(exits)
    out = model.generate(
        **batch, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    assert sum(isinstance(layer, GroupedLayer) for layer in out.past_key_values.layers) == 3
    new = out.sequences[:, batch["input_ids"].shape[1] :]
    logits = torch.stack(out.logits, dim=1)  # [B, steps, vocab]
    for b, sample in enumerate(samples):
        row = new[b]
        n = row.numel()
        if (row == EOS_TOKEN_ID).any():
            n = int((row == EOS_TOKEN_ID).nonzero()[0]) + 1
        row = row[:n]
        assert not (row == PAD_TOKEN_ID).any()
        ref, _ = reference_logits(model, with_tokens(sample, row[:-1]), exits[b])
        assert_close(logits[b, :n], ref[0, -n:], atol=2e-5, rtol=1e-5)


def test_masks_per_decode_step_grow_with_distinct_exits_not_depth(monkeypatch):
    """A decode step builds one mask per layout and one per distinct group of rows of the mixed layers."""
    built = []
    real = grouped.group_masks

    def counting(layer, stream_masks, query_length, config, dtype, shared):
        before = len(shared)
        result = real(layer, stream_masks, query_length, config, dtype, shared)
        built.append(len(shared) - before)
        return result

    monkeypatch.setattr("vtw_train.engine.forward.group_masks", counting)

    def masks_per_step(num_layers: int, exits: list[int]) -> int:
        model = tiny_model("llava", num_layers=num_layers)
        controller = vtw_train.attach(model)
        samples = singles(model, mixed_specs("llava"))
        batch = collate(samples, "left")
        controller.exit_layer = torch.tensor(exits)
        with torch.no_grad():
            cache = model(**batch, use_cache=True).past_key_values
        built.clear()
        _decode_step(model, cache, torch.full((4, 1), 40), batch["attention_mask"])
        return sum(built)

    shallow = masks_per_step(4, [1, 1, 3, 3])
    deep = masks_per_step(12, [1, 1, 11, 11])  # ten mixed layers instead of two, same two groups
    assert shallow == deep == 2
