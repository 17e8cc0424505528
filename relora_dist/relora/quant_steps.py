"""The ReLoRA steps of a quantized frozen base (relora.base_quant): quantize at the switch,
requantize at each reset, requantize after a checkpoint load.

The fp32 merge masters are the truth. Each rank keeps only its `owned_range` slice, so a
requantization gathers the merged fp32 W once (one weight at a time: a transient out x in x 4
bytes per rank, e.g. 11.2 MB for a 350m MLP weight) and every rank quantizes the same tensor.
bitsandbytes' quantization is deterministic, so every rank holds the same bytes (tests/test_quant.py
checks that bitwise at 2 ranks). Quantizing block-aligned slices and all-gathering the packed
bytes would move ~1/7 of the bytes (NF4) but ties the master partition to the quant block layout;
the fp32 all-gather is (world-1)/world x 4 bytes per frozen element per reset, twice the bf16
all-gather an unquantized ZeRO-2 merge already does.
"""

from __future__ import annotations

import torch

from relora_dist.backends.base import Backend, release_memory
from relora_dist.relora.quant import QuantizedWeight, compute_dtype_of
from relora_dist.relora.layer import ReLoRALinear, lora_delta


def full_master(backend: Backend, m: ReLoRALinear, shard: torch.Tensor) -> torch.Tensor:
    """The whole fp32 [out, in] weight from every rank's master slice (collective)."""
    full = backend.shards.gather_owned(m.weight, shard.to(backend.shards.comm_device, torch.float32))
    return full.view(m.out_features, m.in_features)


def quantize_frozen_base(backend: Backend, modules: dict[str, ReLoRALinear], masters, cfg) -> int:
    """Replace every wrapped module's frozen weight by quantize(master) (relora.base_quant).
    Collective. Returns the bytes of quantized weights this rank now holds."""
    r = cfg.relora
    cd = compute_dtype_of(r.quant_compute_dtype, _precision(cfg))
    total = 0
    for name, m in modules.items():
        qw = QuantizedWeight.quantize(full_master(backend, m, masters.shards[name]), r.base_quant, r.quant_double_quant)
        m.quantize_base(qw, cd)
        total += qw.nbytes()
    release_memory()  # the compute-dtype weights just dropped
    return total


def requantize_all(backend: Backend, modules: dict[str, ReLoRALinear], masters) -> None:
    """quantize(master) for every quantized module (after a checkpoint load overwrote the masters)."""
    for name, m in modules.items():
        if m.qweight is not None:
            m.quantize_base(_like(m.qweight, full_master(backend, m, masters.shards[name])), m.quant_compute_dtype)


def merge_quantized(backend: Backend, m: ReLoRALinear, target: torch.Tensor, delta: torch.Tensor,
                    A: torch.Tensor, B: torch.Tensor, mode: str) -> int:
    """Merge into a quantized module. The master slice `target` always gets its rows of s*B*A
    (`delta`), so it stays the exact merged weight. mode "master": Wq <- quantize(master)
    (collective). mode "reference": Wq <- quantize(dequantize(Wq) + s*B*A), as the reference's 4-bit
    merge does; its error compounds over resets (docs/benchmarks.md). Returns bytes received."""
    target.add_(delta.to(device=target.device, dtype=target.dtype))
    if mode == "reference":
        full_delta = lora_delta(A, B, m.scale)
        merged = m.qweight.dequantize() + full_delta.to(m.qweight.data.device)
        m.quantize_base(_like(m.qweight, merged), m.quant_compute_dtype)
        return 0
    m.quantize_base(_like(m.qweight, full_master(backend, m, target)), m.quant_compute_dtype)
    return (backend.world_size - 1) * target.numel() * 4


def _like(qw: QuantizedWeight, full: torch.Tensor) -> QuantizedWeight:
    """`full` quantized the way `qw` was (kind, double quantization)."""
    return QuantizedWeight.quantize(full, qw.kind, qw.double_quant)


def held_quantized_nbytes(modules: dict[str, ReLoRALinear]) -> int:
    return sum(m.qweight.nbytes() for m in modules.values() if m.qweight is not None)


def _precision(cfg) -> str:
    from relora_dist.backends.ds_config import resolve_precision

    return resolve_precision(cfg.train.precision)
