#!/usr/bin/env python
"""Shim for `vtw-train build-toy` (see `vtw-train build-toy --help`)."""

from vtw_train.cli.main import command

if __name__ == "__main__":
    command("build-toy")(None)
