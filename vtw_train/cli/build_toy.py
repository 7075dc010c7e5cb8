"""``vtw-train build-toy --config configs/toy/toy_vlm.yaml``: train the embedded toy VLM from scratch and save it.

Any key of the toy config can be overridden (``--train.steps 200``); a build can be split across
sessions with ``--stop_after STEP`` and continued with ``--resume``, bit for bit the same weights
as an uninterrupted build.

    vtw-train build-toy --config configs/toy/toy_vlm.yaml
    vtw-train build-toy --config configs/toy/toy_vlm.yaml --output_dir /tmp/toy --stop_after 3600
    vtw-train build-toy --config configs/toy/toy_vlm.yaml --output_dir /tmp/toy --resume
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ActionYesNo

from ..config import config_parser


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    from ..toy import toy_vlm_path
    from ..toy.config import ToyBuildConfig
    from ..toy.train import ResumeError, train

    parser = config_parser(ToyBuildConfig, "vtw-train build-toy", __doc__ or "")
    parser.add_argument("--log", type=str, default=None, help="Append monitor metrics (JSONL) here.")
    parser.add_argument(
        "--resume",
        action=ActionYesNo,
        default=False,
        help="Continue the unfinished checkpoint in the output dir (its config must match up to its step).",
    )
    parser.add_argument(
        "--stop_after",
        type=int,
        default=None,
        help="Stop after STEP steps with a resumable checkpoint (split a long build across sessions).",
    )
    namespace = parser.parse_args(None if argv is None else list(argv))
    log, resume, stop_after = namespace.pop("log"), namespace.pop("resume"), namespace.pop("stop_after")
    namespace.pop("config", None)
    try:
        cfg = ToyBuildConfig(**vars(parser.instantiate(namespace)))
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    out = Path(cfg.output_dir) if cfg.output_dir else toy_vlm_path()
    t0 = time.time()
    try:
        acc = train(cfg, out, None if log is None else Path(log), resume=resume, stop_after=stop_after)
    except ResumeError as err:
        raise SystemExit(f"error: {err}") from None
    done = "stopped, resume with --resume" if stop_after else "saved"
    print(f"{done}: {out} after {time.time() - t0:.0f}s; monitor accuracy: {acc}")
    return acc
