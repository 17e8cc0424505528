#!/usr/bin/env python
"""Benchmark the full-rank and ReLoRA phases side by side (world size 2 by default; 1 works), ZeRO-2, ZeRO-3, FSDP2.

    python tools/bench.py --preset 20m --stages 2 3 --out benchmarks/bench_20m.json
    python tools/bench.py --preset tiny --steps 6 --stages 2 --out /tmp/bench_tiny.json   # smoke test
    python tools/bench.py --preset 20m --stages 2 3 fsdp2 --out benchmarks/bench_20m_fsdp2.json   # engines side by side
    python tools/bench.py --preset tiny --steps 6 --world-size 1 --out /tmp/bench_tiny_w1.json   # 2 threads/rank here
    python tools/bench.py --preset tiny --steps 6 --stages 2 --precision bf16 \
        --override=--relora.phase_stage=3 --out /tmp/bench_tiny_ps3.json   # ZeRO-2 warm start, ZeRO-3 ReLoRA phase

See docs/benchmarks.md for what is measured and how to read it; the logic is in relora_dist/bench/.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from relora_dist.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
    sys.stdout.flush()
