#!/usr/bin/env python
"""Thin wrapper, for running from a checkout: `python tools/train_tokenizer.py --help` = `relora-train-tokenizer --help`.
The code lives in relora_dist/tools/train_tokenizer.py (inside the package, so the console script works from
an installed wheel too)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from relora_dist.tools.train_tokenizer import *  # noqa: E402,F401,F403  (re-exported for `from tools.train_tokenizer import ...`)
from relora_dist.tools.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
