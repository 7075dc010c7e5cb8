"""Held-out exact-match accuracy of the toy VLM per question type, with baselines.

    python scripts/eval_toy_vlm.py                 # committed model, 700 held-out samples
    python scripts/eval_toy_vlm.py --noise         # also with every image replaced by noise

The held-out seed (default 999) is never used in training (training draws from
``train.seed``, monitoring from ``train.eval_seed``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from vtw_train.data.exact_match import evaluate_exact_match, majority_baseline, visual_token_share
from vtw_train.data.records import from_sample
from vtw_train.data.synthetic import generate_samples, noise_image
from vtw_train.toy import load_toy_vlm, toy_vlm_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=toy_vlm_path())
    ap.add_argument("--n", type=int, default=700, help="held-out samples (uniform over question types)")
    ap.add_argument("--seed", type=int, default=999, help="held-out seed (never used in training)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--noise", action="store_true", help="also evaluate with noise images")
    ap.add_argument("--blank", action="store_true", help="also evaluate with an empty background image")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    ap.add_argument(
        "--exit-sweep",
        action="store_true",
        help="also accuracy per type at every fixed exit layer K and the KL calibration curve "
        "(needs the exit engine, vtw_train.engine / vtw_train.calibrate)",
    )
    ap.add_argument("--calib-samples", type=int, default=256, help="samples for the KL curve (exit sweep)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = load_toy_vlm(path=args.model_dir)
    records = [from_sample(s, f"{args.seed}-{i}") for i, s in enumerate(generate_samples(args.n, args.seed))]
    t0 = time.time()
    res = evaluate_exact_match(model, processor, records, batch_size=args.batch_size)
    base = majority_baseline(records)
    extra = {}
    out = {
        "n": len(records),
        "seed": args.seed,
        "accuracy": res.per_type | {"overall": res.overall},
        "majority": base,
    }
    if args.noise:
        rng = random.Random(args.seed + 1)
        noisy = evaluate_exact_match(
            model, processor, records, batch_size=args.batch_size, image_transform=lambda im: noise_image(rng)
        )
        extra["noise_image"] = noisy.per_type | {"overall": noisy.overall}
        out["noise_image"] = extra["noise_image"]
    if args.blank:
        from PIL import Image

        from vtw_train.data.synthetic import BACKGROUND, IMAGE_SIZE

        blank = evaluate_exact_match(
            model,
            processor,
            records,
            batch_size=args.batch_size,
            image_transform=lambda im: Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND),
        )
        extra["blank_image"] = blank.per_type | {"overall": blank.overall}
        out["blank_image"] = extra["blank_image"]
    print(res.table(base, extra))
    share = visual_token_share(processor, model.config.image_token_id, records)
    n_vis, n_all = share["visual_tokens"], share["max_prompt_tokens"]
    print(
        f"\nvisual tokens per prompt: {n_vis}; longest prompt {n_all} tokens, so at least "
        f"{share['min_share']:.1%} visual (mean {share['mean_share']:.1%})"
    )
    print(f"eval time {time.time() - t0:.0f}s")
    out["visual_token_share"] = share
    if args.exit_sweep:
        out["exit_sweep"] = exit_sweep(model, processor, records, args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


def exit_sweep(model, processor, records, args) -> dict:
    """Accuracy per question type with visual tokens withdrawn after each layer K, plus the
    KL(P_K || P_full) curve of the engine's calibration on a separate held-out seed."""
    from vtw_train.calibrate import CalibrationConfig, calibrate
    from vtw_train.data import VLMCollator
    from vtw_train.engine import attach

    controller = attach(model)
    n_layers = controller.num_layers
    calib_recs = [from_sample(s) for s in generate_samples(args.calib_samples, args.seed + 7)]
    collate = VLMCollator(processor, mode="generate")
    bs = 32
    batches = []
    for i in range(0, len(calib_recs), bs):
        b = collate(calib_recs[i : i + bs])
        batches.append({k: v for k, v in b.items() if isinstance(v, torch.Tensor)})
    n_cal = (len(calib_recs) // bs) * bs
    record = calibrate(model, batches, CalibrationConfig(num_samples=n_cal, threshold=0.003))
    by_k: dict[int, dict[str, float]] = {}
    for k in range(n_layers + 1):
        with controller.exiting_at(k):
            r = evaluate_exact_match(model, processor, records, batch_size=args.batch_size)
        by_k[k] = r.per_type | {"overall": r.overall}
    types = sorted(next(iter(by_k.values())))
    print(f"\nKL(P_K || P_full), first answer token, {n_cal} calibration samples (seed {args.seed + 7}):")
    print("  " + "  ".join(f"K={k}: {v:.4f}" for k, v in record.kl_curve.items()))
    print(f"  calibrated K at eta=0.003: {record.exit_layer}")
    print("\n| K | " + " | ".join(types) + " |")
    print("|---|" + "---|" * len(types))
    for k, accs in by_k.items():
        print(f"| {k} | " + " | ".join(f"{accs[t]:.3f}" for t in types) + " |")
    return {"kl_curve": record.kl_curve, "calibrated_k": record.exit_layer, "accuracy_by_k": by_k}


if __name__ == "__main__":
    main()
