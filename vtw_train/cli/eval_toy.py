"""``vtw-train eval-toy``: held-out exact match of the toy VLM per question type, with baselines and controls.

    vtw-train eval-toy                              # committed model, 700 held-out samples
    vtw-train eval-toy --noise true --blank true    # also with noise / blank images instead
    vtw-train eval-toy --exit_sweep true            # also accuracy at every fixed exit layer K
    vtw-train eval-toy --vispruner "[32, 16]"       # also VisPruner at T and T random tokens (control)

The held-out seed (default 999) is never used in training (training draws from ``train.seed``,
monitoring from ``train.eval_seed``).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import parse_config


@dataclass
class EvalToyRun:
    """Which model, which samples, which controls."""

    model_dir: str | None = None
    """A toy model directory (default: the committed one)."""
    n: int = 700
    """Held-out samples (uniform over question types)."""
    seed: int = 999
    """Held-out seed (never used in training)."""
    batch_size: int = 64
    """Prompts per generate call."""
    noise: bool = False
    """Also evaluate with every image replaced by uniform noise."""
    blank: bool = False
    """Also evaluate with every image replaced by the empty background."""
    threads: int = 1
    """torch threads."""
    json: str | None = None
    """Write the numbers to this file."""
    exit_sweep: bool = False
    """Also accuracy per type at every fixed exit layer K and the KL calibration curve."""
    calib_samples: int = 256
    """Samples for the KL curve of the exit sweep."""
    vispruner: list[int] = field(default_factory=list)
    """Also VisPruner keeping T of the image's tokens, for each T, next to T tokens kept at random (the control
    that shows what the [CLS] ranking is worth)."""


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from PIL import Image

    from ..data.records import from_sample
    from ..data.synthetic import BACKGROUND, IMAGE_SIZE, generate_samples, noise_image
    from ..evaluation import evaluate_exact_match, majority_baseline, visual_token_share
    from ..toy import load_toy_vlm, toy_vlm_path

    args = parse_config(EvalToyRun, argv, "vtw-train eval-toy", __doc__ or "")
    torch.set_num_threads(args.threads)
    model, processor = load_toy_vlm(path=args.model_dir or toy_vlm_path())
    records = [from_sample(s, f"{args.seed}-{i}") for i, s in enumerate(generate_samples(args.n, args.seed))]
    t0 = time.time()
    with _bar(len(records), "held-out") as bar:
        res = evaluate_exact_match(model, processor, records, batch_size=args.batch_size, progress=bar.update)
    base = majority_baseline(records)
    extra: dict[str, dict[str, float]] = {}
    out: dict[str, Any] = {
        "n": len(records),
        "seed": args.seed,
        "accuracy": res.per_type | {"overall": res.overall},
        "majority": base,
    }
    controls = {}
    if args.noise:
        rng = random.Random(args.seed + 1)
        controls["noise_image"] = lambda im: noise_image(rng)
    if args.blank:
        controls["blank_image"] = lambda im: Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    for name, transform in controls.items():
        r = evaluate_exact_match(
            model, processor, records, batch_size=args.batch_size, image_transform=transform
        )
        extra[name] = out[name] = r.per_type | {"overall": r.overall}
    print(res.table(base, extra))
    share = visual_token_share(processor, model.config.image_token_id, records)
    print(
        f"\nvisual tokens per prompt: {share['visual_tokens']}; longest prompt {share['max_prompt_tokens']} "
        f"tokens, so at least {share['min_share']:.1%} visual (mean {share['mean_share']:.1%})"
    )
    print(f"eval time {time.time() - t0:.0f}s")
    out["visual_token_share"] = share
    if args.vispruner:
        out["vispruner"] = vispruner_control(model, processor, records, args, out["accuracy"]["overall"])
    if args.exit_sweep:
        out["exit_sweep"] = exit_sweep(model, processor, records, args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


def vispruner_control(model, processor, records, args: EvalToyRun, full: float) -> dict[str, Any]:
    """Accuracy per question type with VisPruner at each T and with T random tokens, as shares of the full model."""
    from ..engine import Reduction
    from ..evaluation import evaluate_exact_match
    from ..methods import VisPruner

    results: dict[str, Any] = {}
    for t in args.vispruner:
        for name, pruner in (
            (f"VisPruner T={t}", VisPruner(t)),
            (f"random T={t}", VisPruner(t, ranking="random")),
        ):
            with _bar(len(records), name) as bar:
                r = evaluate_exact_match(
                    model, processor, records, batch_size=args.batch_size, progress=bar.update,
                    reduction=Reduction(input_pruner=pruner),
                )  # fmt: skip
            results[name] = r.per_type | {"overall": r.overall, "of_full": r.overall / full if full else 0.0}
    types = sorted(k for k in next(iter(results.values())) if k not in ("overall", "of_full"))
    print("\n| tokens kept | " + " | ".join(types) + " | overall | of full |")
    print("|---|" + "---|" * (len(types) + 2))
    for name, accs in results.items():
        cells = " | ".join(f"{accs[t]:.3f}" for t in types)
        print(f"| {name} | {cells} | {accs['overall']:.3f} | {accs['of_full']:.1%} |")
    return results


def exit_sweep(model, processor, records, args: EvalToyRun) -> dict[str, Any]:
    """Accuracy per question type with visual tokens withdrawn after each layer K, plus the
    KL(P_K || P_full) curve of VTW's calibration on a separate held-out seed."""
    from ..calibration import CalibrationConfig, calibrate, calibration_batches
    from ..data.records import from_sample
    from ..data.synthetic import generate_samples
    from ..engine import attach
    from ..evaluation import exit_layer_sweep

    calib_recs = [from_sample(s) for s in generate_samples(args.calib_samples, args.seed + 7)]
    bs = 32
    n_cal = (len(calib_recs) // bs) * bs
    batches = calibration_batches(processor, calib_recs, bs, mode="generate")
    record = calibrate(model, batches, CalibrationConfig(num_samples=n_cal))  # the model's own eta
    with _bar(len(records) * (attach(model).num_layers + 1), "exit sweep") as bar:
        sweep = exit_layer_sweep(model, processor, records, batch_size=args.batch_size, progress=bar.update)
    by_k = {k: r.per_type | {"overall": r.overall} for k, r in sweep.items()}
    types = sorted(next(iter(by_k.values())))
    print(f"\nKL(P_K || P_full), first answer token, {n_cal} calibration samples (seed {args.seed + 7}):")
    print("  " + "  ".join(f"K={k}: {v:.4f}" for k, v in record.kl_curve.items()))
    print(f"  calibrated K at eta={record.threshold:g} ({record.threshold_source}): {record.exit_layer}")
    print("\n| K | " + " | ".join(types) + " |")
    print("|---|" + "---|" * len(types))
    for k, accs in by_k.items():
        print(f"| {k} | " + " | ".join(f"{accs[t]:.3f}" for t in types) + " |")
    return {"kl_curve": record.kl_curve, "calibrated_k": record.exit_layer, "accuracy_by_k": by_k}


def _bar(total: int, what: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit="sample", leave=False, dynamic_ncols=True)
