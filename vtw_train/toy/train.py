"""Plain supervised training of the toy VLM on freshly generated synthetic samples.

No exit tricks: the model must behave like an ordinary VLM. Every step draws a new batch
from a seeded generator (no epochs, no overfitting), so a run is deterministic for a seed.
Checkpoints are written atomically, so an interrupted run still leaves a usable model, and
they carry the trainer state (optimizer, schedule, data-generator state), so ``resume=True``
continues the run bit for bit where it stopped: a long build can be split across sessions.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from vtw_train.atomic_write import write_text_atomically
from vtw_train.data.collate import IGNORE_INDEX, VLMCollator
from vtw_train.data.records import from_conversation, from_sample
from vtw_train.data.synthetic import QUESTION_TYPES, generate_conversation, generate_samples
from vtw_train.toy.build import build_model, build_processor
from vtw_train.toy.config import ToyBuildConfig, config_from_checkpoint
from vtw_train.toy.vision_pretrain import pretrain_vision_tower


class TrainingBatches(torch.utils.data.IterableDataset):
    """The training batches of steps ``[first, last)``, in order, from the run's seeded generator.

    Each item is ``(step, batch, generator_state_after_it)``: a checkpoint after that step stores
    the state, so a resumed run draws the same next batch. Run in a ``DataLoader`` worker, the
    next batches are prepared while the model trains; the stream is the same either way.
    """

    def __init__(self, cfg: ToyBuildConfig, rng_state: tuple, first: int, last: int) -> None:
        super().__init__()
        self.cfg, self.rng_state, self.first, self.last = cfg, rng_state, first, last

    def __iter__(self):
        tc = self.cfg.train
        processor = build_processor(self.cfg.arch)
        n_vis = (self.cfg.arch.image_size // self.cfg.arch.patch_size) ** 2
        collate = VLMCollator(processor, "train", expected_image_tokens=n_vis)
        rng = random.Random()
        rng.setstate(self.rng_state)
        for step in range(self.first, self.last):
            phase = phase_at(step, tc)
            recs = [
                from_conversation(generate_conversation(rng, tc.questions_per_image, **phase))
                for _ in range(tc.batch_size)
            ]
            yield step, collate(recs), rng.getstate()


def training_batches(cfg: ToyBuildConfig, rng_state: tuple, first: int, last: int):
    """Iterate :class:`TrainingBatches`, in ``train.data_workers`` background processes (0: here)."""
    batches = TrainingBatches(cfg, rng_state, first, last)
    workers = cfg.train.data_workers
    if workers == 0:
        return iter(batches)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=1, prefetch_factor=4)
    return iter(loader)


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


#: Optimizer, schedule and generator state next to an unfinished checkpoint's weights; a
#: finished model has none (it is not needed for inference and would double the size).
TRAINER_STATE = "trainer_state.pt"


class ResumeError(ValueError):
    """A run cannot be resumed or split as asked; the message names the fix."""


def save_atomically(model, processor, out_dir: Path, meta: dict, trainer_state: dict | None = None) -> None:
    """Write to a sibling temp dir, then swap it in; readers never see a half-written model."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    (tmp / "training_info.json").write_text(json.dumps(meta, indent=2) + "\n")
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _same_run_until(saved: ToyBuildConfig, cfg: ToyBuildConfig, step: int) -> None:
    """Refuse to resume unless ``cfg`` trains exactly as ``saved`` did for steps ``< step``.

    Later phases and the schedule after ``step`` may change: that is how a run is continued
    with a different ending, and the result is then the run the new config describes.
    """
    problems = []
    for section in ("arch", "vision_pretrain"):
        if asdict(getattr(saved, section)) != asdict(getattr(cfg, section)):
            problems.append(section)
    same_anywhere = ("seed", "batch_size", "questions_per_image", "lr", "warmup_steps", "betas",
                     "weight_decay", "grad_clip", "eval_samples", "eval_seed")  # fmt: skip
    for name in same_anywhere:
        if getattr(saved.train, name) != getattr(cfg.train, name):
            problems.append(f"train.{name}")
    for s in range(step):
        if phase_at(s, saved.train) != phase_at(s, cfg.train):
            problems.append(f"train.curriculum (differs at step {s})")
            break
    for s in range(step):
        if lr_factor(s, saved.train) != lr_factor(s, cfg.train):
            problems.append(f"train.steps/flat_fraction/min_lr_ratio (learning rate differs at step {s})")
            break
    if problems:
        raise ResumeError(
            f"cannot resume: the config differs from the checkpoint's before step {step} in "
            f"{', '.join(problems)}; use the config the run was started with (it is stored in "
            f"{TRAINER_STATE}) or only change what happens from step {step} on"
        )


def load_trainer_state(out_dir: Path, cfg: ToyBuildConfig) -> dict:
    """The trainer state of the unfinished checkpoint in ``out_dir``, checked against ``cfg``."""
    path = Path(out_dir) / TRAINER_STATE
    if not path.is_file():
        info = Path(out_dir) / "training_info.json"
        why = (
            f"{out_dir} holds a finished model (training_info.json), which has no trainer state"
            if info.is_file()
            else f"no checkpoint in {out_dir}"
        )
        raise ResumeError(f"cannot resume: {why}; start a new build without --resume")
    state = torch.load(path, weights_only=True)
    _same_run_until(config_from_checkpoint(json.loads(state["config"])), cfg, state["step"])
    if state["step"] >= cfg.train.steps:
        raise ResumeError(
            f"cannot resume: the checkpoint is at step {state['step']}, train.steps is {cfg.train.steps}"
        )
    return state


def drop_log_records_after(log_path: Path, step: int) -> None:
    """Remove monitor records past ``step``: a run killed after its last checkpoint logged
    evaluations that the resumed run will log again, and the log must read as one run."""
    if not log_path.is_file():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text_atomically(log_path, "".join(kept))


def train(
    cfg: ToyBuildConfig,
    out_dir: Path,
    log_path: Path | None = None,
    *,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict[str, float]:
    """Train and write the model to ``out_dir``; returns the last monitor accuracy.

    ``resume`` continues the unfinished checkpoint in ``out_dir``; ``stop_after`` ends the run
    after that many steps with a resumable checkpoint (a build split across sessions).
    """
    tc = cfg.train
    if stop_after is not None and not 0 < stop_after < tc.steps:
        raise ResumeError(
            f"stop_after must be between 1 and train.steps - 1 ({tc.steps - 1}), got {stop_after}"
        )
    state = load_trainer_state(out_dir, cfg) if resume else None
    torch.set_num_threads(tc.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(tc.seed)
    processor = build_processor(cfg.arch)
    model = build_model(cfg.arch, processor.tokenizer, seed=tc.seed)
    vp = cfg.vision_pretrain
    if state is not None:
        saved = type(model).from_pretrained(out_dir, dtype=torch.float32)
        model.load_state_dict(saved.state_dict())
        del saved
    elif vp.steps > 0:
        probe_acc = pretrain_vision_tower(model, processor.image_processor, vp, seed=tc.seed)
        tqdm.write(json.dumps({"vision_pretrain_patch_accuracy": probe_acc}))
    if vp.steps > 0 and vp.freeze_after:
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
    acc: dict[str, float] = {}
    ema = None
    first_step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        version, internal, gauss = state["python_rng"]
        rng.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(state["torch_rng"])
        first_step, ema, acc = state["step"], state["loss_ema"], dict(state["monitor_accuracy"])
        if log_path is not None:
            drop_log_records_after(Path(log_path), first_step)
    log = log_path.open("a") if log_path else None
    start = time.time()
    last_step = stop_after if stop_after is not None else tc.steps
    bar = tqdm(
        range(first_step, last_step),
        desc="toy-vlm",
        dynamic_ncols=True,
        mininterval=5,
        initial=first_step,
        total=tc.steps,
    )
    stream = training_batches(cfg, rng.getstate(), first_step, last_step)
    for step in bar:
        produced, batch, (version, internal, gauss) = next(stream)  # a worker hands tuples back as lists
        assert produced == step, f"batch of step {produced} arrived at step {step}"
        rng_state = (version, tuple(internal), gauss)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        finished = step + 1 == tc.steps
        last = step + 1 == last_step
        if (step + 1) % tc.eval_every == 0 or finished:
            acc = teacher_forced_accuracy(model, eval_batches)
            rec = {"step": step + 1, "loss": ema, "elapsed_s": round(time.time() - start, 1), **acc}
            bar.write(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}))
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
        if (step + 1) % tc.checkpoint_every == 0 or last:
            meta = {"step": step + 1, "steps": tc.steps, "seed": tc.seed, "monitor_accuracy": acc}
            trainer_state = None
            if not finished:
                trainer_state = {
                    "step": step + 1,
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "python_rng": rng_state,
                    "torch_rng": torch.get_rng_state(),
                    "loss_ema": ema,
                    "monitor_accuracy": acc,
                    "config": json.dumps(asdict(cfg)),
                }
            save_atomically(model, processor, out_dir, meta, trainer_state)
    if log:
        log.close()
    return acc


__all__ = [
    "QUESTION_TYPES",
    "TRAINER_STATE",
    "ResumeError",
    "load_trainer_state",
    "lr_factor",
    "save_atomically",
    "teacher_forced_accuracy",
    "train",
]
