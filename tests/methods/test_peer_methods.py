"""FastV and ShortV on the exit engine, each checked against an independent implementation."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import collate, singles

import vtw_train
from vtw_train.calibration import ShortVRecord, layer_contribution
from vtw_train.engine import Reduction
from vtw_train.engine.frozen import frozen_layer_forward, frozen_plan
from vtw_train.methods import FastV
from vtw_train.tiny_models import tiny_model

FAMILIES = ["llava", "llava_next", "qwen2_vl"]


def text_rows(controller, batch):
    ids = batch["input_ids"]
    visual = torch.isin(ids, torch.tensor(controller.visual_token_ids))
    return ~visual & batch["attention_mask"].bool()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def model_and_batch(family, attn="sdpa", padding_side="left"):
    model = tiny_model(family, attn_implementation=attn).eval()
    samples = singles(model, [dict(), dict(seed=5), dict(seed=7)])
    return model, vtw_train.attach(model), samples, collate(samples, padding_side)


# ---------------------------------------------------------------- ShortV
def restore_visual_rows(model, controller, layers, visual):
    """Reference ShortV: run every layer normally, then put the visual rows back as they came in."""
    hooks = []
    for index in layers:

        def hook(module, args, kwargs, output, visual=visual):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            out = torch.where(visual.unsqueeze(-1), hidden_in, out)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        hooks.append(controller.language_model.layers[index].register_forward_hook(hook, with_kwargs=True))
    return hooks


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shortv_equals_restoring_visual_rows(family, attn):
    model, controller, _, batch = model_and_batch(family, attn)
    visual = torch.isin(batch["input_ids"], torch.tensor(controller.visual_token_ids))
    with torch.no_grad():
        full = model(**batch).logits
        hooks = restore_visual_rows(model, controller, [1, 2], visual)
        expected = model(**batch).logits
        for h in hooks:
            h.remove()
        controller.reduction = Reduction(frozen_layers={1, 2})
        got = model(**batch).logits
    keep = text_rows(controller, batch)
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)
    assert (got[keep] - full[keep]).abs().max() > 1e-3  # freezing matters


def test_frozen_layer_text_rows_equal_stock_layer(family):
    model, controller, _, batch = model_and_batch(family)
    visual = torch.isin(batch["input_ids"], torch.tensor(controller.visual_token_ids))
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"])

    layer = controller.language_model.layers[1]
    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**batch, use_cache=False)
    handle.remove()
    hidden, (cos, sin) = captured["hidden"], captured["position_embeddings"]
    with torch.no_grad():
        stock = layer(
            hidden,
            attention_mask=captured["attention_mask"],
            position_embeddings=(cos, sin),
            position_ids=captured.get("position_ids"),
            past_key_values=None,
            use_cache=False,
        )
        plan = frozen_plan(
            visual, batch["attention_mask"], cos, sin, controller.language_model.config, hidden.dtype
        )
        frozen = frozen_layer_forward(layer, 1, hidden, cos, sin, plan, None, {})
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(frozen[~visual & real], stock[~visual & real], rtol=1e-5, atol=1e-5)
    assert torch.equal(frozen[visual], hidden[visual])


def test_shortv_generate_and_batching(family):
    model, controller, samples, batch = model_and_batch(family)
    controller.reduction = Reduction(frozen_layers={0, 2})
    with torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
        alone = [
            model.generate(**s, max_new_tokens=4, do_sample=False)[0, s["input_ids"].shape[1] :]
            for s in samples
        ]
        # cached decode equals recomputing the whole sequence with ShortV at every step
        sample = samples[0]
        ids = sample["input_ids"]
        for _ in range(4):
            step = dict(sample, input_ids=ids, attention_mask=torch.ones_like(ids))
            if "mm_token_type_ids" in sample:
                extra = ids.shape[1] - sample["mm_token_type_ids"].shape[1]
                step["mm_token_type_ids"] = torch.nn.functional.pad(sample["mm_token_type_ids"], (0, extra))
            logits = model(**step, use_cache=False).logits[:, -1]
            suppress = model.generation_config.suppress_tokens or []
            logits[:, suppress] = float("-inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    for row, tokens in enumerate(alone):
        assert batched[row].tolist() == tokens.tolist()
    assert alone[0].tolist() == ids[0, sample["input_ids"].shape[1] :].tolist()


def test_shortv_composes_with_exit(family):
    """Frozen layers before the exit, withdrawal after: layers >= K only ever see text."""
    model, controller, samples, batch = model_and_batch(family)
    with torch.no_grad():
        controller.reduction = Reduction(frozen_layers={0}, exit_layer=2)
        both = model(**batch).logits
        visual = torch.isin(batch["input_ids"], torch.tensor(controller.visual_token_ids))
        controller.reduction = Reduction(exit_layer=2)
        hooks = restore_visual_rows(model, controller, [0], visual)
        expected = model(**batch).logits
        for h in hooks:
            h.remove()
        controller.exit_layer = None
    keep = text_rows(controller, batch)
    torch.testing.assert_close(both[keep], expected[keep], rtol=1e-5, atol=1e-5)


def test_layer_contribution_record(tmp_path):
    model, controller, samples, batch = model_and_batch("llava")
    record = layer_contribution(model, [batch], num_samples=3)
    assert record.num_samples == 3 and len(record.layer_contribution) == controller.num_layers
    scores = record.layer_contribution
    assert record.frozen_order == sorted(range(len(scores)), key=lambda i: scores[i])
    assert all(s >= 0 for s in scores) and max(scores) > 0
    assert record.frozen_layers(2) == frozenset(record.frozen_order[:2])
    assert ShortVRecord.load(record.save(tmp_path / "shortv.json")) == record
    with pytest.raises(ValueError, match="outside"):
        record.frozen_layers(controller.num_layers + 1)
    assert controller.reduction.frozen_layers == frozenset()  # calibration restores the setting
    with pytest.raises(ValueError, match="out of range"):
        controller.reduction = Reduction(frozen_layers={controller.num_layers})


# ---------------------------------------------------------------- FastV
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fastv_keep_all_is_full_and_keep_none_is_vtw(family, attn):
    model, controller, _, batch = model_and_batch(family, attn)
    keep = text_rows(controller, batch)
    with torch.no_grad():
        full = model(**batch).logits
        controller.reduction = Reduction(pruning=FastV(layer=2, keep_ratio=1.0))
        assert torch.equal(model(**batch).logits[keep], full[keep])
        controller.reduction = Reduction(pruning=FastV(layer=2, keep_ratio=0.0))
        none = model(**batch).logits
        controller.reduction = Reduction(exit_layer=2)
        assert torch.equal(none[keep], model(**batch).logits[keep])
        controller.reduction = Reduction(pruning=FastV(layer=2, keep_ratio=0.5))
        half = model(**batch).logits
        controller.reduction = None
    assert (half[keep] - full[keep]).abs().max() > 1e-4 and (half[keep] - none[keep]).abs().max() > 1e-4


def test_fastv_scores_match_eager_attention():
    """The manual last-token attention row equals the eager attention weights of layer K - 1."""
    model, controller, samples, _ = model_and_batch("llava", "eager")
    sample = samples[0]
    captured = {}

    def grab(module, args, kwargs):
        captured.update(hidden=args[0] if args else kwargs["hidden_states"], pe=kwargs["position_embeddings"])

    layer = controller.language_model.layers[1]
    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        out = model(**sample, output_attentions=True, use_cache=False)
    handle.remove()
    eager_row = out.attentions[1][0, :, -1].mean(0)  # heads averaged after the softmax
    from vtw_train.engine.attention import query_attention_row

    n = sample["input_ids"].shape[1]
    cos, sin = captured["pe"]
    with torch.no_grad():
        row = query_attention_row(
            layer, captured["hidden"], cos, sin, torch.tensor([n - 1]), torch.ones(1, n, dtype=torch.bool)
        )
    torch.testing.assert_close(row[0], eager_row, rtol=1e-5, atol=1e-6)
    visual = torch.isin(sample["input_ids"][0], torch.tensor(controller.visual_token_ids))
    keep = FastV(layer=2, keep_ratio=0.25).select(
        layer, captured["hidden"], cos, sin, visual.unsqueeze(0), None
    )
    k = int(round(0.25 * int(visual.sum())))
    expected = eager_row.masked_fill(~visual, -1).topk(k).indices
    assert sorted(keep[0].nonzero().squeeze(1).tolist()) == sorted(expected.tolist())


def test_fastv_batches_and_generate(family):
    model, controller, samples, batch = model_and_batch(family)
    controller.reduction = Reduction(pruning=FastV(layer=1, keep_ratio=0.5))
    keep = text_rows(controller, batch)
    with torch.no_grad():
        batched = model(**batch).logits
        for row, sample in enumerate(samples):
            alone = model(**sample).logits[0]
            sample_keep = ~torch.isin(sample["input_ids"][0], torch.tensor(controller.visual_token_ids))
            torch.testing.assert_close(batched[row][keep[row]], alone[sample_keep], rtol=1e-5, atol=1e-5)
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)[
            :, batch["input_ids"].shape[1] :
        ]
        for row, sample in enumerate(samples):
            alone = model.generate(**sample, max_new_tokens=4, do_sample=False)[
                0, sample["input_ids"].shape[1] :
            ]
            assert generated[row].tolist() == alone.tolist()
    cache = model(**samples[0], use_cache=True).past_key_values
    visual_count = int(torch.isin(samples[0]["input_ids"], torch.tensor(controller.visual_token_ids)).sum())
    n = samples[0]["input_ids"].shape[1]
    assert cache.layers[0].keys.shape[2] == n
    assert cache.layers[1].keys.shape[2] == n - visual_count + int(round(0.5 * visual_count))
    controller.reduction = None


def test_fastv_refuses_bad_settings():
    model, controller, _, batch = model_and_batch("llava")
    with pytest.raises(ValueError, match=">= 1"):
        FastV(layer=0)
    with pytest.raises(ValueError, match="keep_ratio"):
        FastV(keep_ratio=1.5)
    with pytest.raises(ValueError, match="out of range"):
        controller.reduction = Reduction(pruning=FastV(layer=controller.num_layers))
