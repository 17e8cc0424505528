#!/usr/bin/env python
"""Pretraining launcher file for `deepspeed`, `torchrun` and plain `python` (= `relora-pretrain`).

    python launchers/pretrain.py --help        # every option and config key with its default
The logic lives in relora_dist/cli.py; this file only makes a checkout runnable without install.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from relora_dist.cli import main, parse_args  # noqa: E402,F401  (parse_args: tests)

if __name__ == "__main__":
    sys.exit(main())
