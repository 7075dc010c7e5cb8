"""Train the toy VLM from scratch on synthetic VQA and save it (default: the packaged dir).

python scripts/build_toy_vlm.py --config configs/toy_vlm.yaml
python scripts/build_toy_vlm.py --config configs/toy_vlm.yaml --output-dir /tmp/toy --stop-after 3600
python scripts/build_toy_vlm.py --config configs/toy_vlm.yaml --output-dir /tmp/toy --resume
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vtw_train.toy import toy_vlm_path
from vtw_train.toy.config import load_config
from vtw_train.toy.train import ResumeError, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None, help="YAML (see configs/toy_vlm.yaml)")
    ap.add_argument("--output-dir", type=Path, default=None, help="overrides output_dir in the config")
    ap.add_argument("--log", type=Path, default=None, help="append monitor metrics (JSONL) here")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (for smoke runs)")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished checkpoint in the output dir (its config must match up to its step)",
    )
    ap.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEP",
        help="stop after STEP steps with a resumable checkpoint (split a long build across sessions)",
    )
    args = ap.parse_args()
    cfg = load_config(args.config)
    if args.steps is not None:
        cfg.train.steps = args.steps
    out = args.output_dir or (Path(cfg.output_dir) if cfg.output_dir else toy_vlm_path())
    t0 = time.time()
    try:
        acc = train(cfg, out, args.log, resume=args.resume, stop_after=args.stop_after)
    except ResumeError as err:
        raise SystemExit(f"error: {err}") from None
    done = "stopped, resume with --resume" if args.stop_after else "saved"
    print(f"{done}: {out} after {time.time() - t0:.0f}s; monitor accuracy: {acc}")


if __name__ == "__main__":
    main()
