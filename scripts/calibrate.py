#!/usr/bin/env python
"""Shim for `vtw-train calibrate` (see `vtw-train calibrate --help`)."""

from vtw_train.cli.main import run_command

if __name__ == "__main__":
    run_command("calibrate", None)
