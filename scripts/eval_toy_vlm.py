#!/usr/bin/env python
"""Shim for `vtw-train eval-toy` (see `vtw-train eval-toy --help`)."""

from vtw_train.cli.main import run_command

if __name__ == "__main__":
    run_command("eval-toy", None)
