#!/usr/bin/env python
"""Shim for `vtw-train eval-toy` (see `vtw-train eval-toy --help`)."""

from vtw_train.cli.main import command

if __name__ == "__main__":
    command("eval-toy")(None)
