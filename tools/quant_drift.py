#!/usr/bin/env python
"""Drift of a quantized base over ReLoRA resets: the master path (quantize(master_k), what
relora.quant_merge=master does) against the reference path (quantize(dequantize(Wq) + s*B*A)).

    python tools/quant_drift.py --out benchmarks/quant_drift.json   # 1024 x 1024, r=128, 10 resets

Per reset k: the fraction of codes that differ from quantize(master_k) and the relative RMS error
||dequant(Wq_k) - master_k|| / ||master_k||. The 2-rank test (tests/test_quant.py) checks the master
path bitwise at world size 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from relora_dist.relora.quant import QuantizedWeight  # noqa: E402
from relora_dist.relora.layer import draw_lora_A, lora_delta  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--r", type=int, default=128)
    p.add_argument("--resets", type=int, default=10)
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    master0 = torch.randn(a.size, a.size, generator=g) * 0.02
    result = {"size": a.size, "r": a.r, "resets": a.resets}
    # nf4 is bitsandbytes' plain NF4, nf4_double_quant the default of relora.quant_double_quant
    for label, kind, dq in (("nf4", "nf4", False), ("nf4_double_quant", "nf4", True), ("int8", "int8", False)):
        master, ref_q = master0.clone(), QuantizedWeight.quantize(master0, kind, dq)
        rows = []
        for k in range(1, a.resets + 1):
            A = draw_lora_A((a.r, a.size), 0, k, "w")
            B = torch.randn(a.size, a.r, generator=g) * 0.002  # a trained B: |s*B*A| ~ 5% of |W|
            delta = lora_delta(A, B, 32 / a.r)
            master += delta
            exact = QuantizedWeight.quantize(master, kind, dq)
            ref_q = QuantizedWeight.quantize(ref_q.dequantize() + delta, kind, dq)
            norm = float(master.norm())
            rows.append({"k": k,
                         "master_codes_off": 0.0,  # by construction: Wq_k IS quantize(master_k)
                         "master_rel_err": float((exact.dequantize() - master).norm()) / norm,
                         "reference_codes_off": float((ref_q.data != exact.data).float().mean()),
                         "reference_rel_err": float((ref_q.dequantize() - master).norm()) / norm})
        result[label] = rows
        last = rows[-1]
        print(f"{label}: after {a.resets} resets master path rel err {last['master_rel_err']:.4f} (codes off 0), "
              f"reference path rel err {last['reference_rel_err']:.4f} (k=1: {rows[0]['reference_rel_err']:.4f}), "
              f"codes off quantize(master) {last['reference_codes_off']:.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
