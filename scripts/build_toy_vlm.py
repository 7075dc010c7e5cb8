"""Train the toy VLM from scratch on synthetic VQA and save it (default: the packaged dir).

python scripts/build_toy_vlm.py --config configs/toy_vlm.yaml
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vtw_train.toy import toy_vlm_path
from vtw_train.toy.config import load_config
from vtw_train.toy.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None, help="YAML (see configs/toy_vlm.yaml)")
    ap.add_argument("--output-dir", type=Path, default=None, help="overrides output_dir in the config")
    ap.add_argument("--log", type=Path, default=None, help="append monitor metrics (JSONL) here")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (for smoke runs)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    if args.steps is not None:
        cfg.train.steps = args.steps
    out = args.output_dir or (Path(cfg.output_dir) if cfg.output_dir else toy_vlm_path())
    t0 = time.time()
    acc = train(cfg, out, args.log)
    print(f"saved to {out} in {time.time() - t0:.0f}s; monitor accuracy: {acc}")


if __name__ == "__main__":
    main()
