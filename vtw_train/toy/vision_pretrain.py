"""Stage 0 of the toy build: pre-train the vision tower to describe each patch.

Why: real VLMs start from a pre-trained image encoder (LLaVA-1.5 from CLIP ViT-L), so the
language model only has to learn to *find* what the encoder already sees. Trained jointly
from scratch, our toy's decoder spends most of its step budget waiting for usable patch
features. A linear probe per attribute on the tower's output patches (the features the
projector reads) gives the same starting point cheaply: the tower alone is ~7x cheaper
per step than the whole VLM. The probe is thrown away; only stock CLIP weights remain.

Targets are per patch: colour, shape and size of the object drawn in it (a large object
spans its cell's 2x2 patches, a small one fills one), plus the row and column of the patch's
grid cell, so "where" stays linearly readable for location and spatial questions.

Optionally (``cls_target``) the [CLS] token gets a target too: which (colour, shape) pairs the
scene holds. CLIP's [CLS] is trained to summarise the image, so its attention falls on the
patches that matter, and VisPruner ranks visual tokens by exactly that attention. Without it
the toy's [CLS] is never trained, and on the committed tower its attention even avoids the
objects: none of its top-k patches (k = the object patches) lies on one; with it, 95.5% do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from vtw_train.data.synthetic import (
    CELL,
    COLORS,
    GRID,
    IMAGE_SIZE,
    OBJECT_KINDS,
    PATCH,
    SHAPES,
    SIZES,
    Scene,
    render_scene,
    sample_scene,
)

#: Attribute -> number of classes (class 0 = "no object" for the object attributes).
TARGETS: dict[str, int] = {
    "color": len(COLORS) + 1,
    "shape": len(SHAPES) + 1,
    "size": len(SIZES) + 1,
    "row": GRID,
    "col": GRID,
}


@dataclass
class VisionPretrainConfig:
    """Stage 0 settings; ``steps: 0`` skips the stage (the tower then trains with the VLM)."""

    steps: int = 0
    """Steps of tower pre-training with linear probes (0: skip the stage)."""
    batch_size: int = 64
    """Scenes per step."""
    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    min_objects: int = 1
    """Fewest objects per scene."""
    max_objects: int = 5
    """Most objects per scene."""
    freeze_after: bool = True
    """Keep the tower frozen while the VLM trains (LLaVA-1.5 freezes CLIP too); also faster."""
    cls_target: bool = False
    """Also train [CLS] to name the objects present, so that [CLS] attention (VisPruner's
    importance) finds them. Off in the committed build, whose weights predate it."""


def patch_targets(scene: Scene, patches_per_side: int = IMAGE_SIZE // PATCH) -> dict[str, torch.Tensor]:
    """Per-patch class indices (row-major over the patch grid) for every attribute in TARGETS."""
    n = patches_per_side * patches_per_side
    patch = torch.arange(n)
    out = {k: torch.zeros(n, dtype=torch.long) for k in ("color", "shape", "size")}
    out["row"] = patch // patches_per_side * PATCH // CELL
    out["col"] = patch % patches_per_side * PATCH // CELL
    for o in scene.objects:
        top, left, side = o.box
        for r in range(top // PATCH, (top + side) // PATCH):
            for c in range(left // PATCH, (left + side) // PATCH):
                i = r * patches_per_side + c
                out["color"][i] = list(COLORS).index(o.color) + 1
                out["shape"][i] = SHAPES.index(o.shape) + 1
                out["size"][i] = SIZES.index(o.size) + 1
    return out


def objects_present(scene: Scene) -> torch.Tensor:
    """The [CLS] token's target: one presence bit per (colour, shape) pair of OBJECT_KINDS, in its order."""
    present = {(o.color, o.shape) for o in scene.objects}
    return torch.tensor([float(kind in present) for kind in OBJECT_KINDS])


class PatchProbe(nn.Module):
    """One linear head per attribute over the tower's patch features (and one over its [CLS])."""

    def __init__(self, hidden: int, cls_target: bool = False) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in TARGETS.items()})
        self.objects = nn.Linear(hidden, len(OBJECT_KINDS)) if cls_target else None

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """``feats``: the feature layer with [CLS] first; patch heads read the rest."""
        out = {k: h(feats[:, 1:]) for k, h in self.heads.items()}
        if self.objects is not None:
            out["objects"] = self.objects(feats[:, 0])
        return out


def _tower_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The configured layer the projector reads ([CLS] still first; the projector drops it)."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer]


def _batch(rng: random.Random, image_processor, cfg: VisionPretrainConfig) -> tuple[torch.Tensor, dict]:
    scenes = [sample_scene(rng, cfg.min_objects, cfg.max_objects) for _ in range(cfg.batch_size)]
    pixels = image_processor([render_scene(s) for s in scenes], return_tensors="pt")["pixel_values"]
    targets = [patch_targets(s) for s in scenes]
    batch = {k: torch.stack([t[k] for t in targets]) for k in TARGETS}
    if cfg.cls_target:
        batch["objects"] = torch.stack([objects_present(s) for s in scenes])
    return pixels, batch


def _loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = sum(nn.functional.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten()) for k in TARGETS)
    if "objects" in targets:
        loss = loss + nn.functional.binary_cross_entropy_with_logits(logits["objects"], targets["objects"])
    return loss


def pretrain_vision_tower(model, image_processor, cfg: VisionPretrainConfig, seed: int) -> dict[str, float]:
    """Train ``model``'s vision tower in place; returns per-attribute patch accuracy on fresh scenes."""
    torch.manual_seed(seed)
    rng = random.Random(seed + 7919)  # its own stream: the VLM stage's samples do not move
    tower = model.model.vision_tower
    probe = PatchProbe(tower.config.hidden_size, cfg.cls_target)
    params = list(tower.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * max(0.05, 1 - s / max(1, cfg.steps))
    )
    tower.train()
    ema = None
    bar = tqdm(range(cfg.steps), desc="vision tower", dynamic_ncols=True, mininterval=5)
    for _ in bar:
        pixels, targets = _batch(rng, image_processor, cfg)
        loss = _loss(probe(_tower_features(model, pixels)), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
    return probe_accuracy(model, probe, image_processor, cfg, random.Random(seed + 104729))


@torch.no_grad()
def probe_accuracy(
    model, probe: PatchProbe, image_processor, cfg: VisionPretrainConfig, rng
) -> dict[str, float]:
    """Accuracy per attribute over object patches (row/col over all patches); with the [CLS]
    target, ``objects``: the share of images whose [CLS] names exactly the objects present."""
    pixels, targets = _batch(rng, image_processor, cfg)
    logits = probe(_tower_features(model, pixels))
    on_object = targets["color"] > 0
    acc = {}
    for k in TARGETS:
        hit = logits[k].argmax(-1) == targets[k]
        acc[k] = float(
            hit[on_object].float().mean() if k in ("color", "shape", "size") else hit.float().mean()
        )
    if "objects" in targets:
        named = (logits["objects"] > 0).float() == targets["objects"]
        acc["objects"] = float(named.all(dim=1).float().mean())
    return acc
