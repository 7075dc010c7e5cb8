"""Stage 0 of the toy build: per-patch targets are faithful to the pixels, and the stage
trains only the vision tower, deterministically, leaving stock CLIP weights behind."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vtw_train.data import synthetic as syn
from vtw_train.methods.vispruner import cls_attention_importance
from vtw_train.toy.build import build_model, build_processor, miniature_arch
from vtw_train.toy.vision_pretrain import (
    OBJECT_KINDS,
    TARGETS,
    VisionPretrainConfig,
    objects_present,
    patch_targets,
    pretrain_vision_tower,
)


@pytest.mark.parametrize("seed", range(5))
def test_patch_targets_match_the_rendered_pixels(seed):
    """Read every 8-px patch of the image independently: a patch has an object target iff it
    has foreground pixels, and their colour is the target colour; row/col name its cell."""
    rng = random.Random(seed)
    side = syn.IMAGE_SIZE // syn.PATCH
    for _ in range(20):
        scene = syn.sample_scene(rng, 1, 5)
        img = np.asarray(syn.render_scene(scene))
        t = patch_targets(scene)
        assert set(t) == set(TARGETS)
        for i in range(side * side):
            r, c = divmod(i, side)
            px = img[r * syn.PATCH : (r + 1) * syn.PATCH, c * syn.PATCH : (c + 1) * syn.PATCH].reshape(-1, 3)
            fg = px[(px != syn.BACKGROUND).any(axis=1)]
            cell = (r * syn.PATCH // syn.CELL, c * syn.PATCH // syn.CELL)
            assert (int(t["row"][i]), int(t["col"][i])) == cell
            if len(fg) == 0:
                assert t["color"][i] == t["shape"][i] == t["size"][i] == 0
                continue
            colour = list(syn.COLORS)[int(t["color"][i]) - 1]
            assert (fg == syn.COLORS[colour]).all()
            (obj,) = [o for o in scene.objects if (o.row, o.col) == cell]
            assert obj.color == colour
            assert syn.SHAPES[int(t["shape"][i]) - 1] == obj.shape
            assert syn.SIZES[int(t["size"][i]) - 1] == obj.size


def test_cls_target_names_exactly_the_objects_in_the_scene():
    rng = random.Random(3)
    for _ in range(50):
        scene = syn.sample_scene(rng, 1, 5)
        bits = objects_present(scene)
        named = {OBJECT_KINDS[i] for i in bits.nonzero().flatten().tolist()}
        assert named == {(o.color, o.shape) for o in scene.objects}
        assert set(bits.tolist()) <= {0.0, 1.0}


def test_stage_trains_only_the_tower_and_is_deterministic():
    arch = miniature_arch()
    processor = build_processor(arch)
    cfg = VisionPretrainConfig(steps=3, batch_size=4, warmup_steps=1)
    runs = []
    for _ in range(2):
        model = build_model(arch, processor.tokenizer, seed=0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        acc = pretrain_vision_tower(model, processor.image_processor, cfg, seed=0)
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all(k.startswith("model.vision_tower.") for k in changed), sorted(changed)[:5]
        assert set(acc) == set(TARGETS) and all(0.0 <= v <= 1.0 for v in acc.values())
        runs.append(after)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    # Only stock parameter names: the probe is not part of the saved model.
    assert set(runs[0]) == set(build_model(arch, processor.tokenizer, seed=0).state_dict())


def _cls_attention_on_objects(model, processor, scenes) -> float:
    """Share of the top-k patches by VisPruner's [CLS]-attention importance (k = the number of
    object patches) that lie on an object; about k/64 for attention blind to content."""
    tower = model.model.vision_tower
    last_layer = tower.encoder.layers[-1]  # transformers 5: CLIPVisionModel holds the encoder itself
    hits = []
    for scene in scenes:
        pixels = processor.image_processor([syn.render_scene(scene)], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hidden = tower(pixels, output_hidden_states=True).hidden_states
        importance = cls_attention_importance(last_layer, hidden[-2])[0]
        on_object = patch_targets(scene)["color"] > 0
        top = importance.topk(int(on_object.sum())).indices
        hits.append(on_object[top].float().mean().item())
    return sum(hits) / len(hits)


def test_cls_target_makes_cls_attention_pick_the_object_patches():
    """The point of ``cls_target``: VisPruner ranks patches by [CLS] attention, which then finds
    the objects; the same stage without it leaves that attention blind (miniature tower, one
    layer, same seed and steps)."""
    arch = miniature_arch()
    processor = build_processor(arch)
    scenes = [syn.sample_scene(random.Random(i), 2, 5) for i in range(32)]
    share = {}
    for cls_target in (False, True):
        model = build_model(arch, processor.tokenizer, seed=0)
        cfg = VisionPretrainConfig(steps=300, batch_size=16, lr=3e-3, warmup_steps=5, cls_target=cls_target)
        acc = pretrain_vision_tower(model, processor.image_processor, cfg, seed=0)
        assert ("objects" in acc) == cls_target
        share[cls_target] = _cls_attention_on_objects(model, processor, scenes)
    assert share[False] < 0.4 and share[True] > 0.75, share


def test_unknown_vision_pretrain_key_fails_loudly(tmp_path):
    from vtw_train.toy.config import ConfigError, load_config

    p = tmp_path / "bad.yaml"
    p.write_text("vision_pretrain:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_config(p)
