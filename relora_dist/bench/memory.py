"""Bytes an engine holds on one rank, by kind, and the process's RSS (tools/bench.py).

State bytes: every distinct tensor storage the backend lists (`Probe.held_tensors`: the engine's
optimizer and the module's params and grads), read right after the last backward of a step
(gradients alive, Adam state allocated), each storage counted once and attributed to params /
grads / fp32 master / optimizer state. Communication buckets and params gathered at that moment
are reported apart, not in the state. Plus the fp32 merge masters (`trainer.masters.nbytes()`)
and a quantized base's replica. These are the tensors relora_dist/memory/model.py predicts; the
committed benchmarks/bench_*.json agree with it to the byte.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

from relora_dist.backends.probe import probe

# A storage reached under several names is counted once, in the first of these categories (ZeRO-3
# with fp32 compute uses the param partition itself as the fp32 master: it counts as params).
CATEGORY_ORDER = ("optimizer_state", "params", "fp32_master", "grads", "comm_buffers", "gathered_params", "other")
STATE_CATEGORIES = ("params", "grads", "fp32_master", "optimizer_state")


def engine_tensor_bytes(trainer: Any) -> dict:
    """Bytes per category of every distinct storage held by the engine and the module on this rank."""
    claimed: dict[int, str] = {}
    sizes: dict[int, int] = {}
    for _, t, cat in probe(trainer.backend).held_tensors(trainer.engine, trainer.model):
        if t.device.type == "meta" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            continue
        if key not in claimed or CATEGORY_ORDER.index(cat) < CATEGORY_ORDER.index(claimed[key]):
            claimed[key] = cat
        sizes[key] = max(sizes.get(key, 0), storage.nbytes())
    out = {c: 0 for c in CATEGORY_ORDER}
    for key, cat in claimed.items():
        out[cat] += sizes[key]
    from relora_dist.relora.quant_steps import held_quantized_nbytes

    out["params"] += held_quantized_nbytes(trainer.modules)  # a quantized base: a replica outside the engine
    out["merge_masters"] = trainer.masters.nbytes() if trainer.masters is not None else 0
    out["state"] = sum(out[c] for c in STATE_CATEGORIES) + out["merge_masters"]
    # Accelerator-resident state: with relora.merge_master_device=cpu the fp32 merge masters live
    # in host memory (pinned on GPUs) and do not count against the accelerator. On a CPU-only run
    # (DeepSpeed's CPU accelerator, as on the benchmark machine) host and "device" are the same
    # memory, so this figure is only what a GPU run would hold on the device, not a saving here.
    on_host = trainer.cfg.relora.merge_master_device == "cpu"
    out["state_accelerator"] = out["state"] - (out["merge_masters"] if on_host else 0)
    return out


def _proc_status_kb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:  # pragma: no cover - non-Linux
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:  # pragma: no cover - not permitted
        return False


def rss_report(phase_reset: bool) -> dict:
    """ru_maxrss (cumulative over the process: it can only grow), the phase-local peak VmHWM (after
    reset_peak_rss at the phase start) and the current RSS, in MiB."""
    hwm = _proc_status_kb("VmHWM")
    rss = _proc_status_kb("VmRSS")
    return {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "phase_peak_rss_mb": (hwm / 1024) if (hwm is not None and phase_reset) else None,
            "rss_mb": rss / 1024 if rss is not None else None}
