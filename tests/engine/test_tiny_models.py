"""The tiny models and their inputs are the ground every engine test stands on, so check that the
inputs are exactly what the models expect: placeholder counts per image, padding that does not
change any sample's logits, and determinism for a seed."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.testing import assert_close

from vtw_train.tiny_models import (
    FAMILIES,
    FIRST_TEXT_TOKEN_ID,
    IMAGE_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    llava_next_num_image_tokens,
    num_image_tokens,
    tiny_inputs,
    tiny_llava,
    tiny_model,
    unbatch,
    visual_token_mask,
)

QWEN = ("qwen2_vl", "qwen2_5_vl")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Millisecond-sized ops are 10-50x slower with intra-op threads on a shared CPU (thread
    hand-off dominates), so run this module on one thread and restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _image_features(model, inputs) -> list[torch.Tensor]:
    """Per-image features as the model itself produces them (its own count, not ours)."""
    mm = model.model
    with torch.no_grad():
        if model.config.model_type == "llava_next":
            out = mm.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
        elif model.config.model_type == "llava":
            out = mm.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        else:
            out = mm.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    return list(out.pooler_output)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_matches_each_sample_alone(family: str, padding_side: str) -> None:
    """Samples with 1, 2 and 0 images and different lengths: a padded forward must give every
    sample the logits it gets alone, which only holds if placeholders, image order, masks and
    (for Qwen) M-RoPE positions are all right."""
    model = tiny_model(family)
    inputs = tiny_inputs(
        model, 3, padding_side=padding_side, images_per_sample=[1, 2, 0], text_lengths=[5, 9, 4]
    )
    assert inputs["attention_mask"].sum(1).unique().numel() == 3, "samples should differ in length"
    with torch.no_grad():
        batched = model(**inputs).logits
    singles = unbatch(model, inputs)
    assert len(singles) == 3
    for b, single in enumerate(singles):
        with torch.no_grad():
            alone = model(**single).logits
        keep = inputs["attention_mask"][b].bool()
        assert_close(batched[b, keep], alone[0], atol=2e-5, rtol=1e-5)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # right padding warns in generate(); it must still run
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    assert new.shape == (3, 3)
    assert not bool(visual_token_mask(model, new).any()), "decoding must never emit a visual token"


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_generate_matches_each_sample_alone(family: str) -> None:
    model = tiny_model(family)
    inputs = tiny_inputs(model, 3, images_per_sample=[2, 1, 0], text_lengths=[4, 10, 6], seed=3)
    batched = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, -3:]
    for b, single in enumerate(unbatch(model, inputs)):
        alone = model.generate(**single, max_new_tokens=3, do_sample=False)[:, -3:]
        assert torch.equal(batched[b], alone[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_without_any_image(family: str) -> None:
    model = tiny_model(family)
    inputs = tiny_inputs(model, 2, images_per_sample=[0, 0])
    assert "pixel_values" not in inputs
    assert not bool(visual_token_mask(model, inputs["input_ids"]).any())
    with torch.no_grad():
        model(**inputs)
    model.generate(**inputs, max_new_tokens=3, do_sample=False)


def test_llava_visual_token_count() -> None:
    model = tiny_llava()
    inputs = tiny_inputs(model, 2, images_per_sample=[1, 2])
    per_image = [f.shape[0] for f in _image_features(model, inputs)]
    assert per_image == [16, 16, 16] == [num_image_tokens(model)] * 3
    assert visual_token_mask(model, inputs["input_ids"]).sum(1).tolist() == [16, 32]


def test_llava_next_counts_depend_on_image_size() -> None:
    """Anyres: base view + unpadded crops + one newline per row. Our independent count must equal
    the number of features the model produces for every layout, and layouts must differ."""
    model = tiny_model("llava_next")
    sizes = [(28, 56), (56, 28), (56, 56), (40, 30), (60, 20), (20, 60), (100, 30), (28, 28)]
    inputs = tiny_inputs(model, 2, images_per_sample=[3, 5], text_lengths=[6, 12], image_sizes=sizes)
    produced = [f.shape[0] for f in _image_features(model, inputs)]
    expected = [llava_next_num_image_tokens(model.config, s) for s in sizes]
    assert produced == expected
    assert expected == [52, 56, 88, 72, 40, 68, 40, 36]
    in_ids = visual_token_mask(model, inputs["input_ids"]).sum(1).tolist()
    assert in_ids == [sum(expected[:3]), sum(expected[3:])]


@pytest.mark.parametrize("family", QWEN)
def test_qwen_counts_follow_the_grid(family: str) -> None:
    model = tiny_model(family)
    sizes = [(28, 28), (28, 56), (56, 42)]
    inputs = tiny_inputs(model, 2, images_per_sample=[2, 1], text_lengths=[5, 7], image_sizes=sizes)
    grids = inputs["image_grid_thw"].tolist()
    assert grids == [[1, 4, 4], [1, 4, 8], [1, 8, 6]]
    expected = [t * h * w // 4 for t, h, w in grids]
    assert [f.shape[0] for f in _image_features(model, inputs)] == expected == [4, 8, 12]
    # Each image sits between its own vision start / end markers.
    for b, n_images in enumerate([2, 1]):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
        starts = [i for i, t in enumerate(ids) if t == VISION_START_TOKEN_ID]
        ends = [i for i, t in enumerate(ids) if t == VISION_END_TOKEN_ID]
        assert len(starts) == len(ends) == n_images
        spans = [e - s - 1 for s, e in zip(starts, ends, strict=True)]
        assert all(
            ids[s + 1 : e] == [IMAGE_TOKEN_ID] * (e - s - 1) for s, e in zip(starts, ends, strict=True)
        )
        assert spans == (expected[:2] if b == 0 else expected[2:])
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == IMAGE_TOKEN_ID)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_ids_avoid_special_ids_and_prompts_end_with_text(family: str) -> None:
    model = tiny_model(family)
    inputs = tiny_inputs(model, 4, images_per_sample=[1, 2, 0, 3], text_lengths=[2, 5, 3, 4], seed=7)
    ids, keep = inputs["input_ids"], inputs["attention_mask"].bool()
    special = visual_token_mask(model, ids) | torch.isin(
        ids, torch.tensor([VISION_START_TOKEN_ID, VISION_END_TOKEN_ID])
    )
    text = keep & ~special
    assert bool((ids[text] >= FIRST_TEXT_TOKEN_ID).all())
    assert text.sum(1).tolist() == [2, 5, 3, 4]
    for b in range(4):
        row = ids[b][keep[b]]
        assert int(row[0]) >= FIRST_TEXT_TOKEN_ID and int(row[-1]) >= FIRST_TEXT_TOKEN_ID


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_for_a_seed(family: str) -> None:
    rng_before = torch.get_rng_state()
    a, b, c = tiny_model(family, seed=0), tiny_model(family, seed=0), tiny_model(family, seed=1)
    assert torch.equal(rng_before, torch.get_rng_state()), "building must not touch the global RNG"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)

    x, y, z = tiny_inputs(a, seed=5), tiny_inputs(a, seed=5), tiny_inputs(a, seed=6)
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(x["input_ids"], z["input_ids"])
    with torch.no_grad():
        assert_close(a(**x).logits, b(**y).logits, atol=0, rtol=0)


def test_llava_backbones_and_gqa() -> None:
    for backbone, cls in [("llama", "LlamaModel"), ("mistral", "MistralModel"), ("qwen2", "Qwen2Model")]:
        model = tiny_llava(backbone, num_layers=3, hidden_size=32)
        text = model.config.text_config
        assert type(model.model.language_model).__name__ == cls
        assert len(model.model.language_model.layers) == 3 and text.hidden_size == 32
        assert text.num_key_value_heads < text.num_attention_heads
    with pytest.raises(ValueError):
        tiny_model("no-such-family")
    with pytest.raises(ValueError):
        tiny_inputs(tiny_llava(), 1, images_per_sample=[1], image_sizes=[(56, 56)])
