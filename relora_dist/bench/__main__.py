"""`python -m relora_dist.bench ...` = `python tools/bench.py ...`."""

import sys

from relora_dist.bench import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(0 if main() else 1)
