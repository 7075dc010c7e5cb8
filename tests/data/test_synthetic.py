"""The synthetic generator: determinism, rendering faithful to the scene, answers correct."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from vtw_train.data import synthetic as syn
from vtw_train.data.answers import answer_normalize


def test_same_seed_same_samples_and_pixels():
    a, b = syn.generate_samples(30, seed=7), syn.generate_samples(30, seed=7)
    assert [(s.question, s.answer, s.question_type) for s in a] == [
        (s.question, s.answer, s.question_type) for s in b
    ]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(x.image()), np.asarray(y.image()))
    c = syn.generate_samples(30, seed=8)
    assert [s.question for s in a] != [s.question for s in c]


def test_generate_dataset_is_deterministic(tmp_path):
    p1 = syn.generate_dataset(tmp_path / "a", 12, seed=3)
    p2 = syn.generate_dataset(tmp_path / "b", 12, seed=3)
    assert p1.read_text() == p2.read_text()
    rec = json.loads(p1.read_text().splitlines()[0])
    assert rec["conversations"][0]["value"].startswith("<image>\n")
    assert rec["conversations"][1]["from"] == "gpt"
    assert (tmp_path / "a" / rec["image"]).read_bytes() == (tmp_path / "b" / rec["image"]).read_bytes()


def test_every_type_appears_with_short_answers():
    samples = syn.generate_samples(700, seed=1)
    assert {s.question_type for s in samples} == set(syn.QUESTION_TYPES)
    assert all(1 <= len(s.answer.split()) <= 2 for s in samples)


def _decode_scene_from_pixels(img: np.ndarray) -> dict[tuple[int, int], tuple[str, str]]:
    """Independent reading of the image: colour and (small/large) per occupied cell."""
    found = {}
    for r in range(syn.GRID):
        for c in range(syn.GRID):
            cell = img[r * syn.CELL : (r + 1) * syn.CELL, c * syn.CELL : (c + 1) * syn.CELL].reshape(-1, 3)
            fg = cell[(cell != syn.BACKGROUND).any(axis=1)]
            if len(fg) == 0:
                continue
            name = [k for k, v in syn.COLORS.items() if (fg == v).all(axis=1).all()]
            assert len(name) == 1, f"cell {r},{c} mixes colours"
            # A large object (14 px) covers >= 98 px (triangle), a small one (7 px) <= 49 px (square).
            found[(r, c)] = (name[0], "large" if len(fg) > 75 else "small")
    return found


def test_render_matches_scene():
    rng = random.Random(0)
    for _ in range(50):
        scene = syn.sample_scene(rng)
        got = _decode_scene_from_pixels(np.asarray(syn.render_scene(scene)))
        assert got == {(o.row, o.col): (o.color, o.size) for o in scene.objects}


def _reference_answer(scene: syn.Scene, q: str, qtype: str) -> str:
    """Re-derive the answer from the scene, parsing the question text independently."""
    w = q.replace(" ?", "").split()
    objs = scene.objects

    def obj(color, shape):
        (o,) = [o for o in objs if o.color == color and o.shape == shape]
        return o

    if qtype == "exists":
        return "yes" if any(o.color == w[3] and o.shape == w[4] for o in objs) else "no"
    if qtype == "color":
        (o,) = [o for o in objs if o.shape == w[4]]
        return o.color
    if qtype == "shape":
        (o,) = [o for o in objs if o.color == w[4]]
        return o.shape
    if qtype == "size":
        return obj(w[4], w[5]).size
    if qtype == "count":
        if w[2] == "objects" and len(w) == 3:
            n = len(objs)
        elif w[3:] == ["objects"]:
            n = sum(o.color == w[2] for o in objs)
        else:
            n = sum(o.shape + "s" == w[2] for o in objs)
        return syn.NUMBER_WORDS[n]
    if qtype == "location":
        o = obj(w[3], w[4])
        half = syn.GRID // 2
        return ("top" if o.row < half else "bottom") + " " + ("left" if o.col < half else "right")
    if qtype in syn.SPATIAL_RELATIONS:
        a = obj(w[2], w[3])
        rel = w[4]
        b = obj(w[-2], w[-1])
        ok = {"left": a.col < b.col, "right": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}[
            rel
        ]
        return "yes" if ok else "no"
    if qtype == "same_size":
        a, b = obj(w[2], w[3]), obj(w[6], w[7])
        return "yes" if a.size == b.size else "no"
    if qtype == "both_size":
        a, b = obj(w[2], w[3]), obj(w[6], w[7])
        return "yes" if a.size == b.size == w[8] else "no"
    raise AssertionError(qtype)


@pytest.mark.parametrize("seed", [0, 1])
def test_answers_are_correct_for_the_scene(seed):
    for s in syn.generate_samples(400, seed=seed):
        assert _reference_answer(s.scene, s.question, s.question_type) == s.answer, s.question


def test_yes_no_types_are_balanced():
    samples = syn.generate_samples(1400, seed=5)
    for qt in ("exists", "spatial", "same_size"):
        ans = [s.answer for s in samples if s.question_type == qt]
        assert 0.35 < ans.count("yes") / len(ans) < 0.65, qt


@pytest.mark.parametrize(
    ("qtype", "first_answer"), [("size", "small"), ("both_size", "yes"), ("spatial_left_above", "yes")]
)
def test_optional_types_are_opt_in_and_correct(qtype, first_answer):
    """Optional types appear only when a curriculum names them, so default splits stay as they were."""
    assert qtype in syn.OPTIONAL_QUESTION_TYPES and qtype not in syn.QUESTION_TYPES
    assert all(s.question_type not in syn.OPTIONAL_QUESTION_TYPES for s in syn.generate_samples(700, seed=1))
    samples = syn.generate_samples(300, seed=4, type_weights={qtype: 1, "same_size": 1})
    drawn = [s for s in samples if s.question_type == qtype]
    assert len(drawn) > 100
    for s in drawn:
        assert _reference_answer(s.scene, s.question, qtype) == s.answer, s.question
    answers = [s.answer for s in drawn]
    assert 0.35 < answers.count(first_answer) / len(answers) < 0.65
    vocab = set(syn.vocabulary())
    assert all(set(s.question.split()) <= vocab for s in drawn)


def test_questions_use_known_vocabulary_and_normalize():
    vocab = set(syn.vocabulary())
    for s in syn.generate_samples(300, seed=2):
        assert set(s.question.split()) <= vocab
        assert set(s.answer.split()) <= vocab
    assert answer_normalize("  Top-Left. ") == "top left"


def test_unknown_question_type_fails():
    with pytest.raises(ValueError, match="unknown question type"):
        syn.make_question(syn.sample_scene(random.Random(0)), "nope", random.Random(0))


def test_object_count_curriculum():
    rng = random.Random(0)
    single = [syn.generate_sample(rng, {"color": 1, "location": 1}, 1, 1) for _ in range(20)]
    assert all(len(s.scene.objects) == 1 for s in single)
    for qtype in syn.TWO_OBJECT_TYPES:
        with pytest.raises(ValueError, match="at least two objects"):
            syn.generate_sample(rng, {qtype: 1}, 1, 1)
    with pytest.raises(ValueError, match="min_objects"):
        syn.generate_sample(rng, None, 3, 2)


def test_image_is_64_patches_with_cells_on_patch_boundaries():
    assert syn.IMAGE_SIZE == 64 and (syn.IMAGE_SIZE // syn.PATCH) ** 2 == 64
    assert syn.CELL % syn.PATCH == 0


def test_conversation_asks_distinct_questions_about_one_scene():
    rng = random.Random(4)
    for _ in range(50):
        conv = syn.generate_conversation(rng, 4)
        assert 1 <= len(conv) <= 4
        assert len({s.question for s in conv}) == len(conv)
        assert all(s.scene is conv[0].scene for s in conv)
        for s in conv:
            assert _reference_answer(s.scene, s.question, s.question_type) == s.answer
    # Its first question is the stream generate_sample draws, so n_questions=1 changes nothing.
    a = syn.generate_conversation(random.Random(9), 1)
    b = syn.generate_sample(random.Random(9))
    assert (a[0].question, a[0].answer, a[0].scene) == (b.question, b.answer, b.scene)
    with pytest.raises(ValueError, match="n_questions"):
        syn.generate_conversation(rng, 0)


def test_ensure_dataset_writes_once_rewrites_stale_and_never_overwrites_foreign_files(tmp_path):
    path = tmp_path / "d" / "train.jsonl"
    assert syn.ensure_dataset(path, 5, seed=1) is True
    first = path.read_text()
    assert syn.ensure_dataset(path, 5, seed=1) is False and path.read_text() == first
    # Other settings, or a file from an older generator version: rewritten, not reused.
    assert syn.ensure_dataset(path, 7, seed=1) is True and len(path.read_text().splitlines()) == 7
    sidecar = path.with_name(path.name + ".synthetic.json")
    sidecar.write_text(json.dumps({"generator_version": 1, "n": 7, "seed": 1}))
    assert syn.ensure_dataset(path, 7, seed=1) is True
    assert json.loads(sidecar.read_text())["generator_version"] == syn.GENERATOR_VERSION
    # A user's own file at that path is refused, with the way out.
    own = tmp_path / "own.jsonl"
    own.write_text("{}\n")
    with pytest.raises(FileExistsError, match="own.jsonl.*not written by the synthetic generator"):
        syn.ensure_dataset(own, 5, seed=1)
    assert own.read_text() == "{}\n"


def test_spatial_left_above_asks_one_relation_per_axis_and_both_axes():
    """The curriculum step's point is that each object's position alone moves the answer: only
    "left of" and "above" may appear (a flipped relation would cancel that), and both must."""
    drawn = syn.generate_samples(400, seed=6, type_weights={"spatial_left_above": 1})
    relations = [s.question.split()[4] for s in drawn]
    assert set(relations) == {"left", "above"}
    assert 0.35 < relations.count("left") / len(relations) < 0.65
    left_first = [s for s, rel in zip(drawn, relations, strict=True) if rel == "left"]
    # First-order signal: an object in the leftmost column asked about first is (almost) always "yes".
    col0 = [s for s in left_first if _first_object(s).col == 0]
    assert col0 and all(s.answer == "yes" for s in col0)


def _first_object(sample: syn.Sample) -> syn.SceneObject:
    w = sample.question.split()
    (o,) = sample.scene.find(color=w[2], shape=w[3])
    return o
