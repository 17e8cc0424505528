#!/usr/bin/env python
"""Analytic per-rank memory of the full-rank and ReLoRA phases under ZeRO-2/3 and FSDP2 (and of a ZeRO-2
run's ReLoRA phase with host merge masters or under ZeRO-3: relora.merge_master_device, relora.phase_stage).

    python tools/memory_model.py                                   # Markdown tables, 8 and 64 ranks
    python tools/memory_model.py --compute bf16 --detail 350m 8 2  # one configuration's breakdown
    python tools/memory_model.py --compute bf16 --detail 350m 8 2 --master-device cpu   # fp32 merge masters on the host
    python tools/memory_model.py validate --bench benchmarks/bench_tiny.json   # vs measured bytes
    python tools/memory_model.py validate --bench benchmarks/bench_20m_fsdp2.json   # ZeRO-2/3 and FSDP2

The formulas are in relora_dist/memory/model.py and memory/quant.py, tables in memory/tables.py, this
command line and the validation in memory/report.py; docs/benchmarks.md explains it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from relora_dist.memory.report import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
