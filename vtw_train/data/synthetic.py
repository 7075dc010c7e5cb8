"""Deterministic synthetic visual question answering (scenes of shapes on a grid).

Why: nothing can be downloaded here, yet the framework needs a VLM and data whose
answers depend on the image. Scenes are objects on a 4x4 grid of 16-px cells (one
object per cell; each cell is exactly 2x2 of the vision tower's 8-px patches, so a
64x64 image gives 64 visual tokens), so that every question is answerable from the
pixels and the answer can be checked against the scene.

Everything is driven by a ``random.Random(seed)``: the same seed gives the same
images, questions and answers on every platform.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from vtw_train.atomic_write import write_text_atomically

GRID = 4
CELL = 16
IMAGE_SIZE = GRID * CELL
#: Vision-tower patch size the scenes are drawn for: a cell is (CELL // PATCH)^2 patches.
PATCH = 8
#: Side in pixels of a large object (centred in its cell, so it spans the cell's 2x2 patches)
#: and of a small one (exactly one patch, in the cell's quadrant ``SceneObject.quadrant``).
OBJECT_EXTENT = {"large": 14, "small": PATCH}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
#: Every (colour, shape) pair; a scene holds each at most once, so "<colour> <shape>" names one object.
OBJECT_KINDS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
BACKGROUND = (235, 235, 235)
MIN_OBJECTS, MAX_OBJECTS = 2, 5
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
RELATIONS = ("left of", "right of", "above", "below")
#: One relation per axis: the relations of the ``spatial_left_above`` curriculum step.
LEFT_ABOVE_RELATIONS = ("left of", "above")
#: The relations each spatial question type draws from.
SPATIAL_RELATIONS = {"spatial": RELATIONS, "spatial_left_above": LEFT_ABOVE_RELATIONS}

#: Question types, roughly from easy to hard.
QUESTION_TYPES = ("exists", "color", "shape", "count", "location", "spatial", "same_size")
#: Types a training curriculum may name in its ``type_weights`` but that the default
#: (unweighted) stream never draws, so they leave every default dataset and held-out split
#: unchanged. ``size`` ("what size is the red circle ?") is the one-object step towards same_size;
#: ``both_size`` ("are the red circle and the blue square large ?", yes iff both are) the
#: two-object one: unlike same_size, each object's size alone already moves its answer.
#: ``spatial_left_above`` is spatial with only "left of" and "above": the step towards spatial,
#: whose four relations make the answer an XOR of the relation word and the two positions.
OPTIONAL_QUESTION_TYPES = ("size", "both_size", "spatial_left_above")
#: Every type :func:`make_question` can ask: what a curriculum's ``type_weights`` may name.
KNOWN_QUESTION_TYPES = QUESTION_TYPES + OPTIONAL_QUESTION_TYPES
#: Types that name two objects, so a scene needs at least two.
TWO_OBJECT_TYPES = ("spatial", "spatial_left_above", "same_size", "both_size")


@dataclass(frozen=True)
class SceneObject:
    """One object: attributes plus its grid cell (row 0 is the top, col 0 the left).

    A small object fills one patch of its cell, ``quadrant`` (0 top-left, 1 top-right,
    2 bottom-left, 3 bottom-right), so its shape is whole inside one visual token; a large
    one is centred and ignores it. Questions only ever use the cell.
    """

    color: str
    shape: str
    size: str
    row: int
    col: int
    quadrant: int = 0

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int]:
        """(top, left, side) in pixels of the square the object is drawn in: its whole cell when
        large, its quadrant's patch when small. The one place that says where an object sits."""
        top, left = self.row * CELL, self.col * CELL
        if self.size == "large":
            return top, left, CELL
        return top + (self.quadrant // 2) * PATCH, left + (self.quadrant % 2) * PATCH, PATCH


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    def find(self, color: str | None = None, shape: str | None = None) -> list[SceneObject]:
        return [
            o
            for o in self.objects
            if (color is None or o.color == color) and (shape is None or o.shape == shape)
        ]


@dataclass(frozen=True)
class Sample:
    """A rendered scene with one question; ``answer`` is one or two lowercase words."""

    scene: Scene
    question: str
    answer: str
    question_type: str

    def image(self) -> Image.Image:
        return render_scene(self.scene)


def sample_scene(rng: random.Random, min_objects: int = MIN_OBJECTS, max_objects: int = MAX_OBJECTS) -> Scene:
    """Objects with distinct (colour, shape) pairs so that '<colour> <shape>' names one object."""
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample(range(GRID * GRID), n)
    pairs = rng.sample(OBJECT_KINDS, n)
    objs = tuple(
        SceneObject(
            color=c,
            shape=s,
            size=rng.choice(SIZES),
            row=cell // GRID,
            col=cell % GRID,
            quadrant=rng.randrange(4),
        )
        for (c, s), cell in zip(pairs, cells, strict=True)
    )
    return Scene(objs)


def _shape_mask(shape: str, size: str) -> np.ndarray:
    """Boolean mask of a shape centred in its box: the cell (large) or one patch (small)."""
    extent = OBJECT_EXTENT[size]
    box = CELL if size == "large" else PATCH
    off = (box - extent) / 2.0
    yy, xx = np.mgrid[0:box, 0:box].astype(np.float32) + 0.5
    u, v = (xx - off) / extent, (yy - off) / extent  # 0..1 inside the object's box
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "square":
        m = inside
    elif shape == "circle":
        m = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "triangle":  # apex at the top, base at the bottom
        m = inside & (np.abs(u - 0.5) <= v / 2.0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


_MASKS = {(s, z): _shape_mask(s, z) for s in SHAPES for z in SIZES}


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene as a 64x64 RGB image (pure numpy, so it is fast and exact)."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for o in scene.objects:
        mask = _MASKS[(o.shape, o.size)]
        y, x, side = o.box
        img[y : y + side, x : x + side][mask] = COLORS[o.color]
    return Image.fromarray(img, "RGB")


def noise_image(rng: random.Random) -> Image.Image:
    """Uniform noise of the same size: the control image for visual dependence."""
    arr = np.frombuffer(rng.randbytes(IMAGE_SIZE * IMAGE_SIZE * 3), dtype=np.uint8)
    return Image.fromarray(arr.reshape(IMAGE_SIZE, IMAGE_SIZE, 3).copy(), "RGB")


def _yes_no(b: bool) -> str:
    return "yes" if b else "no"


def _relation_holds(a: SceneObject, rel: str, b: SceneObject) -> bool:
    return {
        "left of": a.col < b.col,
        "right of": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[rel]


def make_question(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str] | None:
    """A (question, answer) of the given type, or None when the scene cannot support it."""
    objs = scene.objects
    if qtype == "exists":
        if rng.random() < 0.5:
            o = rng.choice(objs)
            return f"is there a {o.color} {o.shape} ?", "yes"
        # Hard negative: shares the colour or the shape of a present object.
        present = {(o.color, o.shape) for o in objs}
        o = rng.choice(objs)
        cands = [(c, o.shape) for c in COLORS] + [(o.color, s) for s in SHAPES]
        cands = [p for p in cands if p not in present]
        if not cands:
            return None
        c, s = rng.choice(cands)
        return f"is there a {c} {s} ?", "no"
    if qtype == "color":
        uniq = [s for s in SHAPES if len(scene.find(shape=s)) == 1]
        if not uniq:
            return None
        s = rng.choice(uniq)
        return f"what color is the {s} ?", scene.find(shape=s)[0].color
    if qtype == "shape":
        uniq = [c for c in COLORS if len(scene.find(color=c)) == 1]
        if not uniq:
            return None
        c = rng.choice(uniq)
        return f"what shape is the {c} object ?", scene.find(color=c)[0].shape
    if qtype == "size":
        # One object's size: the step towards same_size, whose answer is the XOR of two sizes
        # and so, on its own, gives no gradient towards reading either size.
        o = rng.choice(objs)
        return f"what size is the {o.color} {o.shape} ?", o.size
    if qtype == "count":
        kind = rng.randrange(3)
        if kind == 0:
            return "how many objects ?", NUMBER_WORDS[len(objs)]
        if kind == 1:
            s = rng.choice(SHAPES)
            return f"how many {s}s ?", NUMBER_WORDS[len(scene.find(shape=s))]
        c = rng.choice(list(COLORS))
        return f"how many {c} objects ?", NUMBER_WORDS[len(scene.find(color=c))]
    if qtype == "location":
        o = rng.choice(objs)
        vert = "top" if o.row < GRID // 2 else "bottom"
        horiz = "left" if o.col < GRID // 2 else "right"
        return f"where is the {o.color} {o.shape} ?", f"{vert} {horiz}"
    if qtype in SPATIAL_RELATIONS:
        # With all four relations and balanced answers, neither object's position alone says
        # anything about the answer (for each, "left of" and "right of" pull opposite ways), so
        # training starts with no gradient towards reading positions and stays at chance.
        # With one relation per axis, each position alone moves the answer; the flipped
        # relations are then a sign on a comparison the model already makes.
        rel = rng.choice(SPATIAL_RELATIONS[qtype])
        horizontal = rel in ("left of", "right of")
        pairs = [
            (a, b)
            for a in objs
            for b in objs
            if a is not b and ((a.col != b.col) if horizontal else (a.row != b.row))
        ]
        if not pairs:
            return None
        want = rng.random() < 0.5
        a, b = rng.choice(pairs)
        if _relation_holds(a, rel, b) != want:
            a, b = b, a
        return f"is the {a.name} {rel} the {b.name} ?", _yes_no(_relation_holds(a, rel, b))
    if qtype == "both_size":
        # An AND of two sizes: reading either object already shifts the answer, a first-order
        # gradient that same_size (an XOR) lacks; "both large" or "both small" is same_size.
        if len(objs) < 2:
            return None
        want = rng.random() < 0.5
        # For "yes", ask about a size that two objects share, so that most scenes support it.
        shared = [t for t in SIZES if sum(o.size == t for o in objs) >= 2]
        size = rng.choice(shared if want and shared else SIZES)
        pairs = [(a, b) for a, b in combinations(objs, 2) if (a.size == b.size == size) == want]
        if not pairs:  # no fallback: it would tilt the answers towards "no"
            return None
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:
            a, b = b, a
        return f"are the {a.name} and the {b.name} {size} ?", _yes_no(a.size == b.size == size)
    if qtype == "same_size":
        if len(objs) < 2:
            return None
        want = rng.random() < 0.5
        pairs = [(a, b) for a, b in combinations(objs, 2) if (a.size == b.size) == want]
        if not pairs:
            pairs = list(combinations(objs, 2))
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:
            a, b = b, a
        return f"are the {a.name} and the {b.name} the same size ?", _yes_no(a.size == b.size)
    raise ValueError(f"unknown question type {qtype!r}; known: {KNOWN_QUESTION_TYPES}")


def _draw_type(rng: random.Random, type_weights: Mapping[str, float] | None) -> str:
    """A question type, uniform over all types unless weighted (one ``rng.choices`` call)."""
    types = list(type_weights) if type_weights else list(QUESTION_TYPES)
    weights = [type_weights[t] for t in types] if type_weights else None
    return rng.choices(types, weights=weights)[0]


def generate_sample(
    rng: random.Random,
    type_weights: Mapping[str, float] | None = None,
    min_objects: int = MIN_OBJECTS,
    max_objects: int = MAX_OBJECTS,
) -> Sample:
    """Draw a question type (uniform unless weighted), then a scene that supports it.

    Fewer objects (down to one) serve as a training curriculum: with a single object, even
    unfocused attention over the visual tokens carries its colour and shape, which gives the
    decoder a gradient path towards looking at the image at all.
    """
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}")
    qtype = _draw_type(rng, type_weights)
    if max_objects < 2 and qtype in TWO_OBJECT_TYPES:
        raise ValueError(f"question type {qtype!r} needs scenes with at least two objects")
    while True:
        scene = sample_scene(rng, min_objects, max_objects)
        qa = make_question(scene, qtype, rng)
        if qa is not None:
            return Sample(scene=scene, question=qa[0], answer=qa[1], question_type=qtype)


def generate_conversation(
    rng: random.Random,
    n_questions: int,
    type_weights: Mapping[str, float] | None = None,
    min_objects: int = MIN_OBJECTS,
    max_objects: int = MAX_OBJECTS,
) -> list[Sample]:
    """Several different questions about one scene (a multi-turn training conversation).

    Why: the answer is one or two tokens, so a single-question sample gives the decoder very
    little signal per image; asking up to ``n_questions`` about the same scene multiplies the
    supervision for a fraction of the compute (the visual tokens are shared). The first
    question is drawn exactly as :func:`generate_sample` draws it; later ones redraw their
    type when the scene cannot support it, and repeats are skipped.
    """
    if n_questions < 1:
        raise ValueError(f"n_questions must be >= 1, got {n_questions}")
    first = generate_sample(rng, type_weights, min_objects, max_objects)
    out = [first]
    attempts = 0
    while len(out) < n_questions and attempts < 8 * n_questions:
        attempts += 1
        qtype = _draw_type(rng, type_weights)
        qa = make_question(first.scene, qtype, rng)
        if qa is None or any(qa[0] == s.question for s in out):
            continue
        out.append(Sample(scene=first.scene, question=qa[0], answer=qa[1], question_type=qtype))
    return out


def vocabulary() -> list[str]:
    """Every word the generator can emit (questions and answers), in a fixed order."""
    words = [
        "is", "there", "a", "what", "color", "the", "shape", "object", "how", "many", "objects",
        "where", "of", "are", "and", "same", "size", "?",
    ]  # fmt: skip
    words += list(COLORS) + list(SHAPES) + [f"{s}s" for s in SHAPES]
    words += list(NUMBER_WORDS) + ["yes", "no", "top", "bottom", "left", "right", "above", "below"]
    words += list(SIZES)
    out: list[str] = []
    for w in words:
        if w not in out:
            out.append(w)
    return out


def sample_record(sample: Sample, sample_id: str, image_rel: str) -> dict:
    """The LLaVA-1.5 conversation record for one sample."""
    return {
        "id": sample_id,
        "image": image_rel,
        "conversations": [
            {"from": "human", "value": f"<image>\n{sample.question}"},
            {"from": "gpt", "value": sample.answer},
        ],
        "question_type": sample.question_type,
    }


#: Bumped whenever the same seed would give different scenes, questions or pixels, so that
#: files written by an older generator are regenerated rather than silently reused.
GENERATOR_VERSION = 2
_SIDECAR_SUFFIX = ".synthetic.json"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + _SIDECAR_SUFFIX)


def ensure_dataset(path: str | os.PathLike, n: int, seed: int) -> bool:
    """Make ``path`` hold exactly the synthetic dataset (n, seed) of this generator version.

    Returns True when it (re)wrote the files. A file that this function wrote earlier with other
    settings or an older generator is rewritten, saying why; a file it did not write (no sidecar
    record) is never overwritten: that raises, naming the file and the two ways out.
    """
    path = Path(path)
    want = {"generator_version": GENERATOR_VERSION, "n": n, "seed": seed}
    sidecar = _sidecar(path)
    if path.exists():
        if not sidecar.exists():
            raise FileExistsError(
                f"{path} exists but was not written by the synthetic generator (no {sidecar.name}); "
                "delete it to have it generated, or set the config's synthetic sample count to 0 to use it as is"
            )
        have = json.loads(sidecar.read_text())
        if have == want:
            return False
        print(f"rewriting {path}: it holds synthetic data {have}, the config asks for {want}")
    else:
        print(f"writing {n} synthetic VQA samples (seed {seed}) to {path} ...")
    generate_dataset(path.parent, n, seed=seed, filename=path.name)
    write_text_atomically(sidecar, json.dumps(want) + "\n")
    return True


def generate_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int,
    type_weights: Mapping[str, float] | None = None,
    filename: str = "data.jsonl",
) -> Path:
    """Write ``n`` samples as LLaVA-format JSONL plus ``images/*.png``; returns the JSONL path.

    The JSONL is written to a temporary name and renamed, so a reader never sees half a file.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    path = out / filename
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for i in range(n):
            s = generate_sample(rng, type_weights)
            rel = f"images/{seed}_{i:06d}.png"
            s.image().save(out / rel)
            f.write(json.dumps(sample_record(s, f"{seed}-{i}", rel)) + "\n")
    os.replace(tmp, path)
    return path


def generate_samples(n: int, seed: int, type_weights: Mapping[str, float] | None = None) -> list[Sample]:
    """In-memory samples (no files): the same stream as :func:`generate_dataset` for a seed."""
    rng = random.Random(seed)
    return [generate_sample(rng, type_weights) for _ in range(n)]


__all__: Sequence[str] = [
    "KNOWN_QUESTION_TYPES",
    "OBJECT_KINDS",
    "OPTIONAL_QUESTION_TYPES",
    "QUESTION_TYPES",
    "Sample",
    "Scene",
    "SceneObject",
    "TWO_OBJECT_TYPES",
    "ensure_dataset",
    "generate_conversation",
    "generate_dataset",
    "generate_sample",
    "generate_samples",
    "make_question",
    "noise_image",
    "render_scene",
    "sample_scene",
    "vocabulary",
]
