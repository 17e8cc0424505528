#!/usr/bin/env python
"""Thin wrapper, for running from a checkout: `python tools/eval.py --help` = `relora-eval --help`.
The code lives in relora_dist/tools/eval.py (inside the package, so the console script works from
an installed wheel too)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from relora_dist.tools.eval import *  # noqa: E402,F401,F403  (re-exported for `from tools.eval import ...`)
from relora_dist.tools.eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
