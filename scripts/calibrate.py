#!/usr/bin/env python
"""Calibrate the fixed exit layer K by the KL criterion. Usage: python scripts/calibrate.py --config cfg.yaml"""

from vtw_train.cli.calibrate import main

if __name__ == "__main__":
    main()
