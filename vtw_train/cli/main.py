"""``vtw-train <command>``: one entry point for every job.

Each command reads a typed config (``--config file.yaml`` plus ``--key value`` overrides) and
``vtw-train <command> --help`` lists every setting with its description. The scripts in
``scripts/`` call the same functions.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from importlib import import_module
from typing import Any

#: command -> (module under vtw_train.cli, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "calibrate K, train LoRA + the exit gate, compare, export a gated checkpoint"),
    "evaluate": ("evaluate", "every reduction method side by side (accuracy, FLOPs, time, memory)"),
    "calibrate": ("calibrate", "VTW's exit layer K by the KL criterion"),
    "infer": ("infer", "answer one question about one image with a gated checkpoint"),
    "benchmark": ("benchmark", "measured speedups on a random LLaVA-shaped model"),
    "build-toy": ("build_toy", "train the embedded toy VLM from scratch"),
    "eval-toy": ("eval_toy", "held-out accuracy of the toy VLM, controls and the exit sweep"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: vtw-train <command> [--config FILE] [--key value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`vtw-train <command> --help` lists the command's settings."]
    return "\n".join(lines)


def command(name: str) -> Callable[[Sequence[str] | None], Any]:
    """The ``main`` function of a command."""
    module, _ = COMMANDS[name]
    return import_module(f"vtw_train.cli.{module}").main


def main(argv: Sequence[str] | None = None) -> Any:
    """Run ``argv``'s command and return what it returns; from the shell (``argv`` None) return
    None, since the console script passes the value to ``sys.exit`` (a value there means failure)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"vtw-train: unknown command {name!r}.\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    if argv is None:  # from the shell: the command reads sys.argv itself, as LightningCLI expects
        sys.argv = [f"vtw-train {name}", *rest]
        run_command(name, None)
        return None
    return command(name)(rest)


def run_command(name: str, argv: Sequence[str] | None) -> Any:
    """Run a command from the shell: a mistake in the input is one line naming it, not a traceback.

    ``VTW_TRAIN_DEBUG=1`` shows the traceback.
    """
    try:
        return command(name)(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        if os.environ.get("VTW_TRAIN_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        print("(set VTW_TRAIN_DEBUG=1 to see where it was raised)", file=sys.stderr)
        raise SystemExit(2) from None
