#!/usr/bin/env python
"""Shim for `vtw-train build-toy` (see `vtw-train build-toy --help`)."""

from vtw_train.cli.main import run_command

if __name__ == "__main__":
    run_command("build-toy", None)
