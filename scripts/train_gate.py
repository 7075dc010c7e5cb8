#!/usr/bin/env python
"""Train the exit gate and LoRA adapters, evaluate, export. Usage: python scripts/train_gate.py --config cfg.yaml"""

from vtw_train.cli.train_gate import main

if __name__ == "__main__":
    main()
