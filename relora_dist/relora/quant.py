"""A bitsandbytes-quantized frozen base weight (NF4 or int8) for the ReLoRA phase.

After the switch the wrapped base W is only read, so it is held as a bitsandbytes 4-bit (NF4,
blockwise absmax, block 64) or 8-bit (row-wise absmax, `int8_vectorwise_quant`) tensor. NF4 may
quantize its absmax too (QLoRA's double quantization, bitsandbytes' `compress_statistics`: uint8
absmax in blocks of 256 with one fp32 scale each), 0.516 instead of 0.5625 bytes per weight. The
quantized tensor is a plain attribute of the module: no Parameter and no buffer, so DeepSpeed
neither partitions nor casts it and `state_dict` never contains it. The values live in the fp32
merge masters (relora.steps.FrozenMasters): every quantization is `quantize(master)`.

Forward: `y = x dequant(Wq)^T` in the compute dtype by an autograd Function that saves only the
quantized handle and dequantizes again in backward, so no dequantized W is kept for backward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from relora_dist.config import BASE_QUANT, QUANT_MERGE, ConfigError  # noqa: F401  (relora.base_quant's, quant_merge's words)
NF4_BLOCKSIZE = 64  # bitsandbytes' default 4-bit block
DQ_BLOCKSIZE = 256  # block of the nested absmax quantization (bitsandbytes quantize_4bit, compress_statistics)


def bnb():
    """bitsandbytes, imported with its logger at ERROR: every import on CPU logs "Failed to load
    CPU gemm_4bit_forward from kernels-community" (harmless: that optional kernel is not needed)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


@dataclass
class QuantizedWeight:
    """One quantized [out, in] weight: packed data plus what dequantization needs."""

    kind: str
    data: torch.Tensor
    state: object  # nf4: bitsandbytes QuantState; int8: row statistics (fp32 [out])
    shape: tuple[int, int]
    double_quant: bool = False  # nf4: absmax stored as uint8 + nested QuantState (state.state2)

    @classmethod
    def quantize(cls, full: torch.Tensor, kind: str, double_quant: bool = False) -> "QuantizedWeight":
        """Quantize an fp32 [out, in] weight. Deterministic: the same input gives the same bytes
        (checked bitwise across ranks in tests/test_quant.py), so every rank quantizing the same
        gathered master holds the same replica."""
        F = bnb().functional
        full = full.detach().float().contiguous()
        double_quant = double_quant and kind == "nf4"
        if kind == "nf4":
            data, state = F.quantize_4bit(full, blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                          compress_statistics=double_quant)
        elif kind == "int8":
            data, state, _ = F.int8_vectorwise_quant(full)
        else:
            check_kind(kind, quantized=True)
        return cls(kind, data, state, tuple(full.shape), double_quant)

    def dequantize(self) -> torch.Tensor:
        """fp32 [out, in]."""
        F = bnb().functional
        if self.kind == "nf4":
            return F.dequantize_4bit(self.data, self.state).float()
        return F.int8_vectorwise_dequant(self.data, self.state)

    def _scales(self) -> list[torch.Tensor]:
        """The tensors besides the codes that dequantization reads, per weight."""
        if self.kind != "nf4":
            return [self.state]
        if not self.double_quant:
            return [self.state.absmax]
        return [self.state.absmax, self.state.state2.absmax, self.state.state2.code, self.state.offset.reshape(1)]

    def nbytes(self) -> int:
        """Bytes held: packed codes + absmax (nf4; double quantization: uint8 absmax, its fp32
        scales, the 256-entry map and the offset) or int8 codes + row scales (int8)."""
        return sum(t.numel() * t.element_size() for t in [self.data, *self._scales()])

    def equal(self, other: "QuantizedWeight") -> bool:
        """Bitwise equality of codes and scales."""
        a, b = self._scales(), other._scales()
        return (self.kind == other.kind and self.double_quant == other.double_quant and torch.equal(self.data, other.data)
                and len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)))


def quantized_nbytes(kind: str, out_features: int, in_features: int, double_quant: bool = False) -> int:
    """Bytes of one quantized weight (the memory model's formula; equal to QuantizedWeight.nbytes)."""
    n = out_features * in_features
    if kind == "nf4" and double_quant:
        blocks = -(-n // NF4_BLOCKSIZE)
        return (n + 1) // 2 + blocks + -(-blocks // DQ_BLOCKSIZE) * 4 + 256 * 4 + 4
    if kind == "nf4":
        return (n + 1) // 2 + -(-n // NF4_BLOCKSIZE) * 4
    if kind == "int8":
        return n + out_features * 4
    return 0


class _DequantLinear(torch.autograd.Function):
    """x @ dequant(Wq)^T; saves only the quantized handle (bitsandbytes' MatMul4Bit does the same)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        ctx.qw = qw
        return x @ qw.dequantize().to(x.dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.qw.dequantize().to(grad.dtype), None


def quantized_linear(x: torch.Tensor, qw: QuantizedWeight, compute_dtype: torch.dtype | None) -> torch.Tensor:
    """The base layer's output in `compute_dtype` (None: x's dtype), returned in x's dtype."""
    cd = compute_dtype or x.dtype
    return _DequantLinear.apply(x.to(cd), qw).to(x.dtype)


def compute_dtype_of(name: str, precision: str) -> torch.dtype:
    """relora.quant_compute_dtype: auto follows the training precision."""
    name = precision if name == "auto" else name
    return torch.bfloat16 if name == "bf16" else torch.float32


def check_kind(kind: str, key: str = "base quantization", quantized: bool = False) -> None:
    """A known relora.base_quant kind (`quantized`: one that quantizes, i.e. not none)."""
    kinds = BASE_QUANT[1:] if quantized else BASE_QUANT
    if kind not in kinds:
        raise ValueError(f"{key} '{kind}' unknown: use one of {', '.join(kinds)}")


def check_quant_config(cfg) -> None:
    """That a quantized base has an fp32 master to requantize from (relora.merge_precision=fp32).
    The words of relora.base_quant, quant_compute_dtype and quant_merge are their config types'; the
    ZeRO-3 and FSDP2 refusals need the DeepSpeed config and live in backends/ds_config.py."""
    r = cfg.relora
    if r.base_quant != "none" and r.merge_precision == "bf16":
        raise ConfigError(f"relora.base_quant={r.base_quant} with relora.merge_precision=bf16: there is no fp32 "
                          f"master to requantize from at each reset; use merge_precision=fp32")


def check_packs(shapes: dict[str, tuple[int, int]], kind: str) -> str | None:
    """A one-line problem if bitsandbytes cannot quantize and dequantize a wrapped weight of one of
    these [out, in] shapes (each distinct shape is tried once, on the CPU), else None."""
    if kind == "none":
        return None
    seen = {}
    for name, shape in shapes.items():
        if shape in seen:
            continue
        seen[shape] = name
        try:
            qw = QuantizedWeight.quantize(torch.zeros(shape), kind)
            if tuple(qw.dequantize().shape) != tuple(shape):
                raise ValueError(f"dequantized to {tuple(qw.dequantize().shape)}")
        except Exception as e:  # bitsandbytes raises several types
            return (f"relora.base_quant={kind}: bitsandbytes cannot pack module {name!r} (weight {list(shape)}: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); exclude it from "
                    f"relora.targets or use relora.base_quant=int8/none")
    return None
