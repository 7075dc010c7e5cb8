"""Stage 0 of the toy build: per-patch targets are faithful to the pixels, and the stage
trains only the vision tower, deterministically, leaving stock CLIP weights behind."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vtw_train.data import synthetic as syn
from vtw_train.toy.build import build_model, build_processor, miniature_arch
from vtw_train.toy.vision_pretrain import TARGETS, VisionPretrainConfig, patch_targets, pretrain_vision_tower


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


def test_unknown_vision_pretrain_key_fails_loudly(tmp_path):
    from vtw_train.toy.config import load_config

    p = tmp_path / "bad.yaml"
    p.write_text("vision_pretrain:\n  stepz: 3\n")
    with pytest.raises(KeyError, match="stepz"):
        load_config(p)
