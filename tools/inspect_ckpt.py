#!/usr/bin/env python
"""Thin wrapper, for running from a checkout: `python tools/inspect_ckpt.py --help` = `relora-inspect --help`.
The code lives in relora_dist/tools/inspect_ckpt.py (inside the package, so the console script works from
an installed wheel too)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from relora_dist.tools.inspect_ckpt import *  # noqa: E402,F401,F403  (re-exported for `from tools.inspect_ckpt import ...`)
from relora_dist.tools.inspect_ckpt import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
