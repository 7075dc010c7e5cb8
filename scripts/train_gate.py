#!/usr/bin/env python
"""Shim for `vtw-train train` (see `vtw-train train --help`)."""

from vtw_train.cli.main import command

if __name__ == "__main__":
    command("train")(None)
