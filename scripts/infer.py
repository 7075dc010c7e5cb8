#!/usr/bin/env python
"""Shim for `vtw-train infer` (see `vtw-train infer --help`)."""

from vtw_train.cli.main import run_command

if __name__ == "__main__":
    run_command("infer", None)
