#!/usr/bin/env python
"""Measured vs FLOPs speedups of withdrawal. Usage: python scripts/benchmark.py [--config cfg.yaml] [--repeats 9]"""

from vtw_train.cli.benchmark import main

if __name__ == "__main__":
    main()
