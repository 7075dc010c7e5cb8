#!/usr/bin/env python
"""Compare every visual-token reduction method side by side. Usage: python scripts/evaluate.py --config cfg.yaml"""

from vtw_train.cli.evaluate import main

if __name__ == "__main__":
    main()
