"""VisPruner (vtw_train.methods.vispruner) on tiny random LLaVA, LLaVA-NeXT and Qwen2-VL models.

What is checked, with numbers rather than shapes wherever possible:
* keeping every token is exactly the stock model (logits and greedy tokens);
* the manual [CLS]-attention importance equals eager CLIP attention weights, and the manual
  received attention of Qwen2-VL equals the weights of its eager vision attention;
* the selection is the top-T_imp by importance plus the survivors of the diversity drop (checked
  against a slow list-based re-implementation), in raster order, odd residual counts included;
* a left-padded batch with 0, 1 and 2 images per sample equals per-sample pruned runs;
* generate() on pruned inputs equals a no-cache greedy loop;
* composition with the exit engine equals the hand-written reference loop.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtw_train
from tests.reference_loop import reference_logits
from vtw_train.errors import UnsupportedModelError
from vtw_train.flops import DecoderDims, flops_ratio
from vtw_train.methods import (
    VisPruner,
    cls_attention_importance,
    prune_visual_tokens,
    select_visual_tokens,
)
from vtw_train.methods.vispruner import DIVERSITY_STEP
from vtw_train.tiny_models import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    tiny_inputs,
    tiny_llava,
    tiny_model,
    tiny_qwen2_vl,
    unbatch,
)

FAMILIES = ("llava", "llava_next", "qwen2_vl")
# Tokens per image (LLaVA) / per crop (LLaVA-NeXT) of the tiny CLIP tower: a 4 x 4 patch grid.
TINY_CLIP_TOKENS = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(model, images=(1, 2, 0, 1), lengths=(6, 9, 4, 7), seed=3):
    """Left-padded batch with different image counts and text lengths (LLaVA-NeXT / Qwen2-VL images
    also differ in size, hence in token count)."""
    return tiny_inputs(
        model, len(images), images_per_sample=list(images), text_lengths=list(lengths), seed=seed
    )


def _text_logits(model, inputs, **kwargs):
    """Logits at the non-padding, non-image positions, one [n_text, vocab] tensor per row."""
    with torch.no_grad():
        logits = model(**inputs, **kwargs).logits
    mask = inputs["attention_mask"].bool() & (inputs["input_ids"] != IMAGE_TOKEN_ID)
    return [logits[b, mask[b]] for b in range(logits.shape[0])]


def _greedy_no_cache(model, inputs, steps):
    """Greedy decoding by re-running the full forward without a cache at every step (batch-aware,
    left padding; rows that emitted EOS continue with pad, like generate())."""
    cfg = model.generation_config
    suppress = list(cfg.suppress_tokens or [])
    eos = cfg.eos_token_id
    cur = dict(inputs)
    batch = cur["input_ids"].shape[0]
    done = torch.zeros(batch, dtype=torch.bool)
    new = []
    for _ in range(steps):
        with torch.no_grad():
            last = model(**cur, use_cache=False).logits[:, -1].clone()
        last[:, suppress] = float("-inf")
        token = last.argmax(-1)
        token = torch.where(done, torch.full_like(token, PAD_TOKEN_ID), token)
        new.append(token)
        done |= token == eos
        cur["input_ids"] = torch.cat([cur["input_ids"], token[:, None]], dim=1)
        cur["attention_mask"] = torch.cat([cur["attention_mask"], torch.ones(batch, 1, dtype=torch.long)], 1)
        if "mm_token_type_ids" in cur:
            types = cur["mm_token_type_ids"]
            cur["mm_token_type_ids"] = torch.cat([types, types.new_zeros(batch, 1)], dim=1)
        if "position_ids" in cur:
            pos = cur["position_ids"]
            cur["position_ids"] = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
    return torch.stack(new, dim=1)


def _generate(model, inputs, steps):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "8", None])
def test_num_tokens_is_validated(bad):
    with pytest.raises(ValueError, match="num_tokens"):
        VisPruner(bad)


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan"), "0.5", True, None])
def test_important_ratio_is_validated(bad):
    with pytest.raises(ValueError, match="important_ratio"):
        VisPruner(8, bad)


def test_budgets_describe_and_flops_plan():
    pruner = VisPruner(7, 0.5)
    assert (pruner.important_tokens, pruner.diverse_tokens) == (3, 4)
    assert VisPruner(64, 0.75).important_tokens == 48 and VisPruner(5, 1).diverse_tokens == 0
    desc = pruner.describe()
    assert desc["method"] == "vispruner" and desc["num_tokens"] == 7 and desc["important_ratio"] == 0.5
    assert "VisPruner(num_tokens=7" in repr(pruner)
    plan = VisPruner(128).flops_plan(576, exit_layer=16)
    assert plan.kept_visual_tokens == 128 and plan.exit_layer == 16
    assert VisPruner(128).flops_plan(1152, num_images=2).kept_visual_tokens == 256
    assert VisPruner(600).flops_plan(576).kept_visual_tokens == 576
    # docs/methods.md §11 worked example: LLaVA-1.5-7B, n_t = 60, V = 576.
    dims = DecoderDims(32, 4096, 11008, 32, 32, 128)
    ratios = [flops_ratio(dims, 60, 576, VisPruner(t).flops_plan(576)) for t in (128, 64, 32)]
    assert [round(100 * r) for r in ratios] == [29, 19, 14]
    with pytest.raises(ValueError, match="num_images"):
        pruner.flops_plan(576, num_images=-1)


def test_unsupported_models_and_inputs_fail_clearly():
    qwen25 = tiny_model("qwen2_5_vl")
    with pytest.raises(NotImplementedError, match="Qwen2.5-VL"):
        prune_visual_tokens(qwen25, tiny_inputs(qwen25, 1), 2)
    model = tiny_llava()
    inputs = tiny_inputs(model, 2)

    class Other(torch.nn.Module):
        config = type("Cfg", (), {"model_type": "idefics3"})()

    with pytest.raises(UnsupportedModelError, match="idefics3"):
        prune_visual_tokens(Other(), inputs, 2)
    with pytest.raises(ValueError, match="inputs_embeds"):
        prune_visual_tokens(model, {**inputs, "inputs_embeds": torch.zeros(1)}, 4)
    mixed = dict(inputs)
    mixed["attention_mask"] = inputs["attention_mask"].clone()
    mixed["attention_mask"][0, -1] = 0  # row 0 left-padded and right-padded at once
    with pytest.raises(ValueError, match="contiguous"):
        prune_visual_tokens(model, mixed, 4)
    truncated = {k: v for k, v in inputs.items()}
    truncated["pixel_values"] = inputs["pixel_values"][:1]  # two samples' placeholders, one image
    with pytest.raises(ValueError, match="image tokens"):
        prune_visual_tokens(model, truncated, 4)


# ----------------------------------------------------------------------------------------------
# Importance signals
# ----------------------------------------------------------------------------------------------


def test_cls_importance_matches_eager_clip_attention():
    """The manual [CLS] row equals eager CLIP's attention weights at the layer feeding the projector
    (vision_feature_layer=-2 on a 2-layer tower: layer 0), and prune_visual_tokens (on SDPA) uses it."""
    eager = tiny_llava(attn_implementation="eager")
    inputs = _batch(eager)
    tower = eager.model.vision_tower
    with torch.no_grad():
        out = tower(
            inputs["pixel_values"], output_attentions=True, output_hidden_states=True, return_dict=True
        )
    for layer_idx, layer in enumerate(tower.encoder.layers):
        expected = out.attentions[layer_idx][:, :, 0, 1:].mean(dim=1)
        got = cls_attention_importance(layer, out.hidden_states[layer_idx])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    sdpa = tiny_llava(attn_implementation="sdpa")  # same seed, same weights
    assert sdpa.model.vision_tower.config._attn_implementation == "sdpa"
    _, info = prune_visual_tokens(sdpa, inputs, 5, return_info=True)
    feeding = eager.config.vision_feature_layer % (len(tower.encoder.layers) + 1) - 1
    expected = out.attentions[feeding][:, :, 0, 1:].mean(dim=1)
    got = torch.stack([image.importance[0] for image in info.images])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_received_attention_matches_eager_qwen2_vl_vision_attention(monkeypatch):
    """Qwen2-VL fallback: mean attention received per patch in the last vision block, grouped 2x2,
    equals what eager vision attention computes (weights recorded from its attention function)."""
    import transformers.models.qwen2_vl.modeling_qwen2_vl as qwen_modeling

    model = tiny_qwen2_vl(attn_implementation="eager")
    inputs = _batch(model)
    _, info = prune_visual_tokens(model, inputs, 2, return_info=True)

    recorded = []
    original = qwen_modeling.eager_attention_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, **kwargs)
        if module is model.model.visual.blocks[-1].attn:
            recorded.append(weights.detach())
        return out, weights

    monkeypatch.setattr(qwen_modeling, "eager_attention_forward", recording)
    with torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert len(recorded) == len(info.images) == inputs["image_grid_thw"].shape[0]
    for weights, image in zip(recorded, info.images, strict=True):
        received = weights[0].mean(dim=(0, 1))  # [1, heads, S, S] -> [S]
        expected = received.view(-1, 4).mean(dim=-1)
        torch.testing.assert_close(image.importance[0], expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


def _slow_diverse(residual: list[int], normed: torch.Tensor, target: int) -> list[int]:
    """docs/methods.md §5.1 step 4 written with plain lists, as an oracle for the tensor version."""
    if target == 0:
        return []
    cosine = (normed @ normed.T).tolist()
    residual = list(residual)
    while len(residual) > target:
        side_a, side_b = residual[0::2], residual[1::2]
        step = min(DIVERSITY_STEP, len(residual) - target, len(side_a))
        scores = [max(cosine[a][b] for b in side_b) for a in side_a]
        by_score = sorted(range(len(side_a)), key=lambda i: -scores[i])  # stable: ties keep list order
        residual = [side_a[i] for i in by_score[step:]] + side_b
    return residual


@pytest.mark.parametrize(
    ("patches", "num_tokens", "ratio"),
    [
        (16, 7, 0.5),  # odd residual count: T_imp = 3, R = 13
        (16, 8, 0.5),
        (16, 3, 0.0),  # diversity only
        (16, 5, 1.0),  # importance only (the reference looped forever here)
        (16, 15, 0.5),
        (7, 2, 0.5),  # R = 6 -> T_div = 1: the step is capped by |A|
        (6, 2, 0.5),  # R = 5, T_div = 1: more to drop than A holds
        (576, 64, 0.5),
        (576, 58, 0.5),  # reference defect 2's example
        (576, 32, 0.75),
    ],
)
def test_selection_is_top_importance_plus_diverse_in_raster_order(patches, num_tokens, ratio):
    gen = torch.Generator().manual_seed(patches * 1000 + num_tokens)
    importance = torch.rand(patches, generator=gen)
    features = torch.randn(patches, 12, generator=gen)
    sel = select_visual_tokens(importance, features, num_tokens, ratio)

    n_imp = int(num_tokens * ratio)
    assert sel.kept.numel() == num_tokens
    assert torch.equal(sel.kept, torch.sort(sel.kept).values), "kept tokens must be in raster order"
    assert sel.kept.unique().numel() == num_tokens
    order = torch.argsort(importance, descending=True)
    assert sel.important.tolist() == order[:n_imp].tolist()
    assert set(sel.kept.tolist()) == set(sel.important.tolist()) | set(sel.diverse.tolist())
    assert not set(sel.important.tolist()) & set(sel.diverse.tolist())
    normed = torch.nn.functional.normalize(features, dim=-1)
    assert sel.diverse.tolist() == _slow_diverse(order[n_imp:].tolist(), normed, num_tokens - n_imp)


def test_diversity_drops_near_duplicates():
    """Two clusters of near-identical features, everything equally important: the diverse picks must
    cover both clusters instead of taking several copies of one."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 16, generator=gen)
    features = torch.cat([base[0] + 1e-3 * torch.randn(8, 16, generator=gen), base[1].expand(8, 16)])
    features[8:] += 1e-3 * torch.randn(8, 16, generator=gen)
    sel = select_visual_tokens(torch.zeros(16), features, 2, 0.0)
    assert {i // 8 for i in sel.kept.tolist()} == {0, 1}


def test_selection_candidates_and_keep_all():
    importance = torch.arange(10.0)
    features = torch.eye(10)
    allowed = torch.tensor([True] * 4 + [False] * 6)
    sel = select_visual_tokens(importance, features, 2, 1.0, candidates=allowed)
    assert sel.kept.tolist() == [2, 3]
    assert select_visual_tokens(importance, features, 10, 0.5).kept.tolist() == list(range(10))
    assert select_visual_tokens(importance, features, 50, 0.5).kept.tolist() == list(range(10))


# ----------------------------------------------------------------------------------------------
# Integration with stock models
# ----------------------------------------------------------------------------------------------


def _keep_all_tokens(family):
    return 8 if family == "qwen2_vl" else TINY_CLIP_TOKENS


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_token_is_the_stock_model(family):
    """T = tokens per image (per crop on LLaVA-NeXT) keeps everything: bit-identical logits and
    identical greedy tokens. Qwen2-VL's images here have 4, 8, 6 and 4 merged tokens; T = 8 keeps all."""
    model = tiny_model(family)
    inputs = _batch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Qwen2-VL: T exceeds the smaller images, by design here
        pruned, info = prune_visual_tokens(model, inputs, _keep_all_tokens(family), return_info=True)
    assert torch.equal(pruned["input_ids"], inputs["input_ids"])
    assert torch.equal(pruned["attention_mask"], inputs["attention_mask"])
    assert info.visual_tokens_after == info.visual_tokens_before
    with torch.no_grad():
        ref = model(**inputs).logits
        got = model(**pruned).logits
    assert torch.equal(got, ref)
    assert torch.equal(_generate(model, pruned, 5), _generate(model, inputs, 5))


def test_larger_budget_than_an_image_keeps_it_with_a_note():
    model = tiny_qwen2_vl()
    inputs = _batch(model)  # images of 4, 8, 6 and 4 merged tokens
    with pytest.warns(UserWarning, match="kept in full"):
        _, info = prune_visual_tokens(model, inputs, 6, return_info=True)
    assert [image.kept_tokens for image in info.images] == [4, 6, 6, 4]
    assert info.notes and "num_tokens=6" in info.notes[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_prompt_layout(family):
    model = tiny_model(family)
    inputs = _batch(model)
    pruned, info = prune_visual_tokens(model, inputs, 3, 0.5, budget="surviving", return_info=True)
    assert info.padding_side == "left"
    assert {"pixel_values", "image_sizes", "image_grid_thw"}.isdisjoint(pruned)
    ids, mask = pruned["input_ids"], pruned["attention_mask"]
    # Left padding kept, text tokens unchanged and in order, one placeholder per kept feature.
    assert bool((mask[:, 1:] >= mask[:, :-1]).all()) and bool(mask[:, -1].all())
    for b in range(ids.shape[0]):
        old = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        new = ids[b][mask[b].bool()]
        assert new[new != IMAGE_TOKEN_ID].tolist() == old[old != IMAGE_TOKEN_ID].tolist()
    features = pruned["mm_encoder_outputs"]["image"].pooler_output
    assert [f.shape[0] for f in features] == [image.kept_tokens for image in info.images]
    assert info.visual_tokens_after == (ids == IMAGE_TOKEN_ID).sum(1).tolist()
    if family == "llava":
        assert [image.kept_tokens for image in info.images] == [3, 3, 3, 3]
    if family == "llava_next":
        # Base view pruned to 3, every anyres crop to at most 3 of its unpadded tokens, newlines kept.
        for image in info.images:
            assert image.selections[0].kept.numel() == 3
            assert all(sel.kept.numel() <= 3 for sel in image.selections[1:])
    if family == "qwen2_vl":
        types = pruned["mm_token_type_ids"]
        assert torch.equal(types.bool() & mask.bool(), (ids == IMAGE_TOKEN_ID) & mask.bool())
        assert pruned["position_ids"].shape == (3, *ids.shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_features_are_the_selected_rows_of_the_stock_features(family):
    """What reaches the LLM is the stock feature rows at the kept indices, and on LLaVA the kept
    indices are the top-T_imp by [CLS] importance plus diverse ones."""
    model = tiny_model(family)
    inputs = _batch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Qwen2-VL: the 4-token images are kept in full
        pruned, info = prune_visual_tokens(model, inputs, 5, 0.6, budget="surviving", return_info=True)
    with torch.no_grad():
        if family == "qwen2_vl":
            stock = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        elif family == "llava_next":
            stock = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        else:
            stock = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    kept = pruned["mm_encoder_outputs"]["image"].pooler_output
    pruned_somewhere = False
    for full, got, image in zip(stock.pooler_output, kept, info.images, strict=True):
        assert torch.equal(got, full[image.kept_index])
        for sel, importance in zip(image.selections, image.importance, strict=True):
            assert torch.equal(sel.kept, torch.sort(sel.kept).values)
            if sel.num_candidates <= 5:  # small crop / image: kept in full
                assert sel.kept.numel() == sel.num_candidates
                continue
            pruned_somewhere = True
            assert sel.important.numel() == 3 and sel.diverse.numel() == 2  # int(5 * 0.6) = 3
            ranked = importance[sel.important]
            assert torch.equal(ranked, torch.sort(ranked, descending=True).values)
            assert float(ranked.min()) >= float(importance[sel.diverse].max())
            if family != "llava_next":  # NeXT crops rank only their unpadded tokens
                top = torch.argsort(importance, descending=True)[:3]
                assert sel.important.tolist() == top.tolist()
    assert pruned_somewhere


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_per_sample_runs(family):
    """Left padding, 1/2/0/1 images per sample: each row's text logits equal its own pruned run."""
    model = tiny_model(family)
    inputs = _batch(model)
    pruned, info = prune_visual_tokens(model, inputs, 3, 0.5, return_info=True)
    batched = _text_logits(model, pruned)
    first = 0
    for b, sample in enumerate(unbatch(model, inputs)):
        single, single_info = prune_visual_tokens(model, sample, 3, 0.5, return_info=True)
        mine = [im for im in info.images if im.sample == b]
        assert [im.kept_index.tolist() for im in single_info.images] == [
            im.kept_index.tolist() for im in mine
        ]
        first += len(mine)
        (expected,) = _text_logits(model, single)
        torch.testing.assert_close(batched[b], expected, atol=1e-5, rtol=1e-5)
    assert first == len(info.images)


def test_right_padding_equals_left_padding_in_forward():
    model = tiny_llava()
    left = _batch(model)
    right = tiny_inputs(
        model, 4, images_per_sample=[1, 2, 0, 1], text_lengths=[6, 9, 4, 7], seed=3, padding_side="right"
    )
    pruned_left = prune_visual_tokens(model, left, 4)
    pruned_right, info = prune_visual_tokens(model, right, 4, return_info=True)
    assert info.padding_side == "right"
    assert bool(pruned_right["attention_mask"][:, 0].all())
    for a, b in zip(_text_logits(model, pruned_left), _text_logits(model, pruned_right), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_labels_follow_the_tokens():
    model = tiny_llava()
    inputs = _batch(model)
    labels = torch.where(inputs["input_ids"] == IMAGE_TOKEN_ID, -100, inputs["input_ids"])
    labels[inputs["attention_mask"] == 0] = -100
    pruned = prune_visual_tokens(model, {**inputs, "labels": labels}, 4)
    expected = torch.where(pruned["input_ids"] == IMAGE_TOKEN_ID, -100, pruned["input_ids"])
    expected[pruned["attention_mask"] == 0] = -100
    assert torch.equal(pruned["labels"], expected)
    out = model(**pruned)  # training-style call: loss over the shortened prompt, gradients flow
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None


def test_no_images_is_a_no_op():
    model = tiny_llava()
    inputs = tiny_inputs(model, 2, images_per_sample=[0, 0])
    pruned = prune_visual_tokens(model, inputs, 4)
    assert "mm_encoder_outputs" not in pruned
    assert torch.equal(pruned["input_ids"], inputs["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_pruned_inputs_equals_no_cache_greedy(family):
    model = tiny_model(family)
    inputs = _batch(model)
    pruned = prune_visual_tokens(model, inputs, 3, 0.5)
    got = _generate(model, pruned, 6)
    expected = _greedy_no_cache(model, prune_visual_tokens(model, inputs, 3, 0.5), 6)
    assert torch.equal(got, expected)


def test_strategy_prepare_records_info():
    model = tiny_llava()
    inputs = _batch(model)
    pruner = VisPruner(4, 0.5)
    pruned = pruner.prepare(model, inputs)
    assert pruner.last_info is not None and pruner.last_info.visual_tokens_after == [4, 8, 0, 4]
    plan = pruner.last_info.exit_plan(1, exit_layer=2)
    assert plan.kept_visual_tokens == 8 and plan.exit_layer == 2
    assert pruner.flops_plan(32, num_images=2).kept_visual_tokens == 8
    assert set(pruned) >= {"input_ids", "attention_mask", "mm_encoder_outputs"}


# ----------------------------------------------------------------------------------------------
# Composition with the exit engine (docs/methods.md §10)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exit_layer", [0, 1, 3, 4])
def test_composition_with_exit_engine_equals_reference_loop(exit_layer, monkeypatch):
    """VisPruner then VTW: withdrawing the remaining T tokens at layer K, through the engine, equals
    the hand-written reference loop run on the pruned prompt with the pruned features."""
    model = tiny_llava()
    (sample,) = unbatch(model, tiny_inputs(model, 1, images_per_sample=[2], text_lengths=[8], seed=5))
    pruned = prune_visual_tokens(model, sample, 5, 0.5)
    features = pruned["mm_encoder_outputs"]["image"].pooler_output

    controller = vtw_train.attach(model)
    controller.exit_layer = exit_layer
    (got,) = _text_logits(model, pruned)

    # The reference loop encodes images through get_image_features; hand it the pruned features.
    monkeypatch.setattr(
        model.model, "get_image_features", lambda *a, **k: BaseModelOutputWithPooling(pooler_output=features)
    )
    reference_inputs = {
        "input_ids": pruned["input_ids"],
        "attention_mask": pruned["attention_mask"],
        "pixel_values": torch.zeros(len(features), 3, 28, 28),
    }
    expected, _ = reference_logits(model, reference_inputs, exit_layer)
    torch.testing.assert_close(got, expected[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_composition_with_exit_engine_batched_and_generate(family):
    """Engine at K=2 on a pruned, left-padded batch: equals per-sample engine runs, and generate()
    equals the no-cache greedy loop through the same engine."""
    model = tiny_model(family)
    inputs = _batch(model)
    vtw_train.attach(model).exit_layer = 2
    pruned = prune_visual_tokens(model, inputs, 3, 0.5)
    batched = _text_logits(model, pruned)
    for b, sample in enumerate(unbatch(model, inputs)):
        (expected,) = _text_logits(model, prune_visual_tokens(model, sample, 3, 0.5))
        torch.testing.assert_close(batched[b], expected, atol=1e-5, rtol=1e-5)
    got = _generate(model, pruned, 5)
    assert torch.equal(got, _greedy_no_cache(model, prune_visual_tokens(model, inputs, 3, 0.5), 5))


# ----------------------------------------------------------------------------------------------
# The toy LLaVA through its processor and collator
# ----------------------------------------------------------------------------------------------


def test_toy_llava_through_the_collator():
    from vtw_train.data import VLMCollator, from_sample
    from vtw_train.data.synthetic import generate_samples
    from vtw_train.toy.build import build_model, build_processor, miniature_arch

    arch = miniature_arch()
    processor = build_processor(arch)
    model = build_model(arch, processor.tokenizer, seed=0).eval()
    records = [from_sample(s) for s in generate_samples(3, seed=11)]
    batch = VLMCollator(processor, "generate")(records)
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    per_image = (arch.image_size // arch.patch_size) ** 2
    image_token = model.config.image_token_id
    assert int((inputs["input_ids"][0] == image_token).sum()) == per_image == 64

    pruned = prune_visual_tokens(model, {**batch}, per_image)  # collator lists pass through
    assert pruned["answers"] == batch["answers"]
    model_inputs = {k: v for k, v in pruned.items() if k not in ("answers", "question_types", "ids")}
    with torch.no_grad():
        assert torch.equal(model(**model_inputs).logits, model(**inputs).logits)

    pruned, info = prune_visual_tokens(model, inputs, 9, 0.5, return_info=True)
    assert info.visual_tokens_after == [9, 9, 9]
    assert int((pruned["input_ids"] == image_token).sum()) == 27
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        out = model.generate(**pruned, max_new_tokens=3, do_sample=False, pad_token_id=pad)
        logits = model(**pruned).logits
    assert out.shape[0] == 3
    assert math.isfinite(float(logits.abs().max()))


def test_next_reference_budget_equals_select_then_unpad():
    """VisPruner's own code on LLaVA-NeXT: T tokens per crop chosen among all of the crop's tokens, then the
    model's unpadding. Computed here directly: the projected crop features with every token that was not
    selected replaced by NaN, packed by the model itself; the rows that are not NaN are what reaches the LLM."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from vtw_train.methods import VisPruner

    model = tiny_model("llava_next")
    inputs = _batch(model)
    T, ratio = 5, 0.6
    pruner = VisPruner(T, ratio)  # the default budget is the reference's
    assert pruner.budget == "reference"
    pruned = pruner.prepare(model, dict(inputs))
    info = pruner.last_info
    base, config = model.model, model.config
    with torch.no_grad():
        tower = base.vision_tower(inputs["pixel_values"].flatten(0, 1), output_hidden_states=True)
        layer = config.vision_feature_layer % len(tower.hidden_states)
        importance = cls_attention_importance(
            getattr(base.vision_tower, "vision_model", base.vision_tower).encoder.layers[layer - 1],
            tower.hidden_states[layer - 1],
        )
        selected_layer = tower.hidden_states[layer][:, 1:]
        projected = base.multi_modal_projector(selected_layer)
    sizes = inputs["image_sizes"]
    crops = [
        image_size_to_num_patches(
            image_size=s,
            grid_pinpoints=config.image_grid_pinpoints,
            patch_size=config.vision_config.image_size,
        )
        for s in sizes
    ]
    # pixel_values is padded to the largest crop count; keep each image's real crops
    per_image_crops = inputs["pixel_values"].shape[1]
    keep_rows = torch.cat(
        [torch.arange(i * per_image_crops, i * per_image_crops + n) for i, n in enumerate(crops)]
    )
    importance, selected_layer, projected = (
        importance[keep_rows],
        selected_layer[keep_rows],
        projected[keep_rows],
    )
    marked = projected.clone()
    for c in range(marked.shape[0]):
        chosen = select_visual_tokens(importance[c], selected_layer[c], T, ratio).kept
        drop = torch.ones(marked.shape[1], dtype=torch.bool)
        drop[chosen] = False
        marked[c, drop] = float("nan")
    packed, _ = base.pack_image_features(
        list(torch.split(marked, crops)),
        sizes,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_newline=base.image_newline,
    )
    features = pruned["mm_encoder_outputs"]["image"].pooler_output
    for got, expected in zip(features, packed, strict=True):
        kept = expected[~expected.isnan().any(-1)]
        assert got.shape == kept.shape
        torch.testing.assert_close(got, kept, rtol=1e-5, atol=1e-6)
    # The reference budget can keep fewer than T per crop (the letterbox drops some chosen tokens), while
    # the surviving budget keeps exactly T of the unpadded tokens.
    surviving = VisPruner(T, ratio, budget="surviving")
    surviving.prepare(model, dict(inputs))
    assert sum(info.visual_tokens_after) < sum(surviving.last_info.visual_tokens_after)
    assert pruner.kept_visual_tokens() == info.visual_tokens_after


def test_random_control_keeps_as_many_tokens_from_the_same_candidates_but_others():
    """The control for the [CLS] ranking: same budget, same candidates, raster order, a seeded random choice."""
    from vtw_train.methods.vispruner import RandomSelection

    importance, features = torch.arange(20.0), torch.randn(20, 4)
    candidates = torch.arange(20) % 3 != 0
    a = RandomSelection(seed=5)(importance, features, 6, candidates=candidates)
    b = RandomSelection(seed=5)(importance, features, 6, candidates=candidates)
    assert a.kept.tolist() == b.kept.tolist() == sorted(a.kept.tolist()) and len(a.kept) == 6
    assert bool(candidates[a.kept].all()) and a.num_candidates == int(candidates.sum())
    ranked = select_visual_tokens(importance, features, 6, 1.0, candidates=candidates)
    assert ranked.kept.tolist() != a.kept.tolist()  # the top-6 by importance are the last six candidates
    assert len(RandomSelection(seed=5)(importance, features, 50).kept) == 20  # T above the count keeps all

    model = tiny_llava()
    inputs = _batch(model)
    ranked_pruner, control = VisPruner(3), VisPruner(3, ranking="random", seed=1)
    cls = ranked_pruner.prepare(model, inputs)
    randomly = control.prepare(model, inputs)
    assert torch.equal(
        randomly["attention_mask"], cls["attention_mask"]
    )  # the same number of tokens per image
    assert control.kept_visual_tokens() == ranked_pruner.kept_visual_tokens()
    chosen = [im.kept_index.tolist() for im in control.last_info.images]
    assert chosen != [im.kept_index.tolist() for im in ranked_pruner.last_info.images]
    assert "ranking='random'" in repr(control) and control.describe()["ranking"] == "random"
    with pytest.raises(ValueError, match="ranking"):
        VisPruner(3, ranking="attention")
