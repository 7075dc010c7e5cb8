#!/usr/bin/env python
"""Shim for `vtw-train train` (see `vtw-train train --help`)."""

from vtw_train.cli.main import run_command

if __name__ == "__main__":
    run_command("train", None)
