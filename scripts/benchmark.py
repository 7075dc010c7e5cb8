#!/usr/bin/env python
"""Shim for `vtw-train benchmark` (see `vtw-train benchmark --help`)."""

from vtw_train.cli.main import run_command

if __name__ == "__main__":
    run_command("benchmark", None)
