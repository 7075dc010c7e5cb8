#!/usr/bin/env python
"""Answer a question about an image with a gated checkpoint.

Usage: python scripts/infer.py --checkpoint DIR --image IMG.png --question "..." [--policy gate|fixed|gate_capped]
"""

from vtw_train.cli.infer import main

if __name__ == "__main__":
    main()
