"""Collation through the processor: answer-only labels, left padding for generation."""

from __future__ import annotations

import pytest
import torch

from vtw_train.data import IGNORE_INDEX, ImageTokenMismatchError, Turn, VLMCollator, VQARecord, from_sample
from vtw_train.data.synthetic import generate_samples
from vtw_train.toy.build import build_processor

N_VIS = 64


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def records():
    # Different question lengths so that padding actually happens.
    samples = generate_samples(40, seed=11)
    by_len = sorted(samples, key=lambda s: len(s.question.split()))
    return [from_sample(s, str(i)) for i, s in enumerate([by_len[0], by_len[-1], by_len[20]])]


def test_train_labels_cover_exactly_the_answer(processor, records):
    batch = VLMCollator(processor, "train", expected_image_tokens=N_VIS)(records)
    tok = processor.tokenizer
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    for row, rec in enumerate(records):
        lab = batch["labels"][row]
        kept = lab[lab != IGNORE_INDEX].tolist()
        assert kept == tok(rec.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        # The kept span sits right after "assistant :" and matches input_ids there.
        pos = (lab != IGNORE_INDEX).nonzero().flatten()
        assert torch.equal(batch["input_ids"][row, pos], lab[pos])
        prev = tok.convert_ids_to_tokens(batch["input_ids"][row, pos[0] - 2 : pos[0]].tolist())
        assert prev == ["assistant", ":"]
    # Right padding in train mode, never labelled.
    assert (batch["attention_mask"][:, 0] == 1).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["attention_mask"] == 0).any(), "fixture should need padding"


def test_generate_mode_left_pads_prompts(processor, records):
    batch = VLMCollator(processor, "generate", expected_image_tokens=N_VIS)(records)
    assert "labels" not in batch
    assert (batch["attention_mask"][:, -1] == 1).all(), "prompts must end at the right edge"
    assert (batch["attention_mask"] == 0).any()
    tok = processor.tokenizer
    for row in range(len(records)):
        assert tok.convert_ids_to_tokens(batch["input_ids"][row, -2:].tolist()) == ["assistant", ":"]
        assert (batch["input_ids"][row] == processor.image_token_id).sum() == N_VIS
    assert batch["answers"] == [r.answer for r in records]
    assert batch["question_types"] == [r.question_type for r in records]


def test_visual_tokens_dominate_the_prompt(processor):
    recs = [from_sample(s) for s in generate_samples(200, seed=4)]
    batch = VLMCollator(processor, "generate")(recs)
    n_vis = (batch["input_ids"] == processor.image_token_id).sum(1)
    share = n_vis / batch["attention_mask"].sum(1)
    assert (n_vis == N_VIS).all()
    assert share.min() >= 0.75, f"visual share {share.min():.3f} < 0.75"


def test_chat_template_is_the_minimal_llava_one(processor):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many objects ?"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "USER: <image>\nhow many objects ? ASSISTANT:"


def test_multi_turn_labels_every_answer(processor):
    rec = VQARecord(
        id="m",
        images=[generate_samples(1, seed=0)[0].image()],
        turns=[
            Turn("user", "<image>\nhow many objects ?"),
            Turn("assistant", "two"),
            Turn("user", "is there a red circle ?"),
            Turn("assistant", "no"),
        ],  # fmt: skip
    )
    batch = VLMCollator(processor, "train")([rec])
    kept = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(kept) == ["two", "</s>", "no", "</s>"]


def test_synthetic_conversation_labels_each_answer_once(processor):
    import random

    from vtw_train.data import from_conversation
    from vtw_train.data.synthetic import generate_conversation

    conv = generate_conversation(random.Random(3), 4)
    rec = from_conversation(conv, "c")
    assert sum("<image>" in t.text for t in rec.turns) == 1 and rec.turns[0].text.startswith("<image>\n")
    batch = VLMCollator(processor, "train", expected_image_tokens=N_VIS)([rec])
    kept = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    tok = processor.tokenizer
    want = []
    for s in conv:
        want += tok(s.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert kept == want


def _reference_labels(processor, rec: VQARecord) -> list[int]:
    """Answer spans found the slow, obvious way: run the processor on every prefix with its images."""
    from vtw_train.data.records import load_image, turn_to_message

    msgs = [turn_to_message(t) for t in rec.turns]
    images = [load_image(im) for im in rec.images]

    def length(text: str) -> int:
        k = text.count("<image>")
        kw = {"images": images[:k]} if k else {}
        return int(processor(text=[text], return_tensors="pt", **kw)["attention_mask"].sum())

    full = processor.apply_chat_template(msgs, tokenize=False)
    ids = processor(text=[full], images=images or None, return_tensors="pt")["input_ids"][0]
    kept: list[int] = []
    for i, t in enumerate(rec.turns):
        if t.role == "assistant":
            a = length(processor.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True))
            b = length(processor.apply_chat_template(msgs[: i + 1], tokenize=False))
            kept += ids[a:b].tolist()
    return kept


def test_prefix_lengths_match_processing_every_prefix_with_its_images(processor):
    """The collator tokenizes prefixes without re-processing images; every placement of images
    across turns (none yet, all, some) must give the spans the processor itself would."""
    imgs = [s.image() for s in generate_samples(2, seed=1)]
    u, a = (lambda x: Turn("user", x)), (lambda x: Turn("assistant", x))
    recs = [
        VQARecord("one", imgs[:1], [u("<image>\nhow many objects ?"), a("two")]),
        VQARecord("multi", imgs[:1], [u("<image>\nis there a red circle ?"), a("no"), u("how many objects ?"), a("two")]),
        VQARecord("late", imgs[:1], [u("how many objects ?"), a("two"), u("<image>\nwhat color is the circle ?"), a("red")]),
        VQARecord(
            "split",
            imgs,
            [u("<image>\nhow many objects ?"), a("two"), u("<image>\nwhere is the red circle ?"), a("top left")],
        ),
        VQARecord("text", [], [u("how many objects ?"), a("two")]),
    ]  # fmt: skip
    batch = VLMCollator(processor, "train")(recs)
    for row, rec in enumerate(recs):
        lab = batch["labels"][row]
        assert lab[lab != IGNORE_INDEX].tolist() == _reference_labels(processor, rec), rec.id


def test_image_token_mismatch_is_reported(processor, records):
    with pytest.raises(ImageTokenMismatchError, match="expected 65"):
        VLMCollator(processor, "train", expected_image_tokens=65)(records)
    # Truncation that cuts into the image is caught too, naming the record.
    with pytest.raises(ImageTokenMismatchError, match="<memory>"):
        VLMCollator(processor, "generate", max_length=40, expected_image_tokens=N_VIS)(records)


def test_bad_mode_rejected(processor):
    with pytest.raises(ValueError, match="mode"):
        VLMCollator(processor, "eval")
