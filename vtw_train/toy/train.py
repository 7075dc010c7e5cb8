"""Plain supervised training of the toy VLM on freshly generated synthetic samples.

No exit tricks: the model must behave like an ordinary VLM. Every step draws a new batch
from a seeded generator (no epochs, no overfitting), so a run is deterministic for a seed.
Checkpoints are written atomically, so an interrupted run still leaves a usable model.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from vtw_train.data.collate import IGNORE_INDEX, VLMCollator
from vtw_train.data.records import from_conversation, from_sample
from vtw_train.data.synthetic import QUESTION_TYPES, generate_conversation, generate_samples
from vtw_train.toy.build import build_model, build_processor
from vtw_train.toy.config import ToyBuildConfig
from vtw_train.toy.vision_pretrain import pretrain_vision_tower


def lr_factor(step: int, cfg) -> float:
    """Linear warmup, flat for ``flat_fraction`` of the run, then cosine to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    flat_end = int(cfg.flat_fraction * cfg.steps)
    if step < flat_end:
        return 1.0
    t = (step - flat_end) / max(1, cfg.steps - flat_end)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def phase_at(step: int, cfg) -> dict:
    """Generator arguments (type weights, object counts) of the curriculum phase at ``step``."""
    for phase in cfg.curriculum:
        if step < phase.until_fraction * cfg.steps:
            return {
                "type_weights": phase.type_weights,
                "min_objects": phase.min_objects,
                "max_objects": phase.max_objects,
            }
    return {}


@torch.no_grad()
def teacher_forced_accuracy(model, batches: list[dict]) -> dict[str, float]:
    """Exact match under teacher forcing: every answer token (and EOS) must be the argmax.

    This equals greedy-decoding exact match (greedy emits exactly these tokens iff each is
    the argmax given the previous ones) at the cost of one forward pass.
    """
    model.eval()
    hits: dict[str, list[int]] = defaultdict(list)
    for b in batches:
        inputs = {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "pixel_values")}
        logits = model(**inputs).logits[:, :-1]
        labels = b["labels"][:, 1:]
        ok = (logits.argmax(-1) == labels) | (labels == IGNORE_INDEX)
        for qt, row in zip(b["question_types"], ok.all(dim=1).tolist(), strict=True):
            hits[qt].append(int(row))
    model.train()
    acc = {qt: sum(v) / len(v) for qt, v in sorted(hits.items())}
    acc["overall"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return acc


def save_atomically(model, processor, out_dir: Path, meta: dict) -> None:
    """Write to a sibling temp dir, then swap it in; readers never see a half-written model."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    (tmp / "training_info.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def train(cfg: ToyBuildConfig, out_dir: Path, log_path: Path | None = None) -> dict[str, float]:
    """Train from scratch and write the model to ``out_dir``; returns the last monitor accuracy."""
    tc = cfg.train
    torch.set_num_threads(tc.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(tc.seed)
    processor = build_processor(cfg.arch)
    model = build_model(cfg.arch, processor.tokenizer, seed=tc.seed)
    vp = cfg.vision_pretrain
    if vp.steps > 0:
        probe_acc = pretrain_vision_tower(model, processor.image_processor, vp, seed=tc.seed)
        tqdm.write(json.dumps({"vision_pretrain_patch_accuracy": probe_acc}))
        if vp.freeze_after:
            model.model.vision_tower.requires_grad_(False)
    model.train()
    n_vis = (cfg.arch.image_size // cfg.arch.patch_size) ** 2
    collate = VLMCollator(processor, "train", expected_image_tokens=n_vis)

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in n or "embedding" in n else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=tc.betas,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tc))
    trainable = [p for p in model.parameters() if p.requires_grad]  # model order, as clipping had it

    assert tc.eval_seed != tc.seed, "the monitoring seed must differ from the training seed"
    eval_samples = generate_samples(tc.eval_samples, tc.eval_seed)
    eval_batches = []
    for i in range(0, len(eval_samples), 64):
        recs = [from_sample(s) for s in eval_samples[i : i + 64]]
        b = collate(recs)
        b["question_types"] = [r.question_type for r in recs]
        eval_batches.append(b)

    rng = random.Random(tc.seed)
    log = log_path.open("a") if log_path else None
    acc: dict[str, float] = {}
    start = time.time()
    ema = None
    bar = tqdm(range(tc.steps), desc="toy-vlm", dynamic_ncols=True, mininterval=5)
    for step in bar:
        phase = phase_at(step, tc)
        recs = [
            from_conversation(generate_conversation(rng, tc.questions_per_image, **phase))
            for _ in range(tc.batch_size)
        ]
        batch = collate(recs)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        last = step + 1 == tc.steps
        if (step + 1) % tc.eval_every == 0 or last:
            acc = teacher_forced_accuracy(model, eval_batches)
            rec = {"step": step + 1, "loss": ema, "elapsed_s": round(time.time() - start, 1), **acc}
            bar.write(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}))
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
        if (step + 1) % tc.checkpoint_every == 0 or last:
            meta = {"step": step + 1, "steps": tc.steps, "seed": tc.seed, "monitor_accuracy": acc}
            save_atomically(model, processor, out_dir, meta)
    if log:
        log.close()
    return acc


__all__ = ["QUESTION_TYPES", "lr_factor", "save_atomically", "teacher_forced_accuracy", "train"]
