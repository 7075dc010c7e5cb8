#!/usr/bin/env python
"""Shim for `vtw-train evaluate` (see `vtw-train evaluate --help`)."""

from vtw_train.cli.main import run_command

if __name__ == "__main__":
    run_command("evaluate", None)
