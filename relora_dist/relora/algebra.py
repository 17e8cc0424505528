"""ReLoRA's tensor algebra, apart from any module or engine: the draws of A, the fp32 merge delta
``s * B @ A`` (whole, by rows, or as a slice of the row-major flattened weight, which is what a
ZeRO-3 rank owns), the optimizer-state prune masks and the rank diagnostics. The wrapped layer
(relora/layer.py) and the named steps of a distributed run (relora/steps.py) call these.

Deliberate differences from the reference implementation (github Guitaricet/relora):
* A is drawn from a generator seeded by a stable hash of (seed, restart_index, module_name) instead of
  relying on every rank having consumed the global RNG identically; every rank and every world size
  draws the identical A.
* Magnitude pruning finds its threshold with ``torch.kthvalue`` so it works above 2**24 elements
  (``torch.quantile`` raises there; axolotl silently skips such tensors); its ``quantile`` rule
  computes torch.quantile's value from order statistics, so it has no such limit either.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable

import torch
from torch import Tensor

from relora_dist.relora.rules import ReLoRAConfigError, check_prune, check_prune_threshold

# --------------------------------------------------------------------------------------------------
# Deterministic seeding
# --------------------------------------------------------------------------------------------------

def _stable_seed(*parts: object) -> int:
    """63-bit seed from a stable hash (sha256) of ``parts``; independent of PYTHONHASHSEED/process."""
    key = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


# --------------------------------------------------------------------------------------------------
# Re-init draws and merge deltas
# --------------------------------------------------------------------------------------------------

def draw_lora_A(shape: Iterable[int], seed: int, restart_index: int, module_name: str) -> Tensor:
    """fp32 CPU tensor ~ Kaiming-uniform(a=sqrt(5)) for a weight of ``shape = [r, in]``, i.e.
    U(-1/sqrt(in), 1/sqrt(in)) (gain sqrt(2/(1+5)), bound sqrt(3)*gain/sqrt(fan_in)).
    Seeded by a sha256 of (seed, restart_index, module_name): identical on every rank / world size."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ReLoRAConfigError(f"lora_A shape {shape} is invalid: expected [r, in_features] with both >= 1")
    bound = 1.0 / math.sqrt(shape[1])
    g = _generator(_stable_seed("lora_A", int(seed), int(restart_index), module_name))
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=g)


def _check_AB(A: Tensor, B: Tensor) -> None:
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0] or A.shape[0] < 1:
        raise ReLoRAConfigError(
            f"adapter shapes A{tuple(A.shape)} B{tuple(B.shape)} do not chain: expected A [r, in], B [out, r]")


# Rows per GEMM block. Blocks start at multiples of this row index of the WHOLE weight, so the
# GEMM that produces a given row always has the same operands and shape, whichever row range or
# flat slice (rank, world size) asks for it. 256 rows keep the fp64 temporary at 256 x in x 8 bytes
# (8 MiB at in=4096) and waste at most one block per slice edge.
_DELTA_BLOCK_ROWS = 256


def _delta_rows(A: Tensor, B: Tensor, scale: float, row0: int, row1: int) -> Tensor:
    """Rows [row0, row1) of ``scale * B @ A`` as fp32: fp64 GEMMs over fixed row blocks of B, each
    rounded once to fp32. Products of fp32 values are exact in fp64, so an element carries only
    fp64 summation error (~r * 2^-53 relative) before its single rounding to fp32: the result is
    the correctly rounded fp32 of the exact product except within ~1e-16 of a rounding tie, and it
    is bitwise the same for every partition because each row always comes from the same block
    GEMM. One GEMM per block replaces r rank-1 updates (measured 2736x1024, r=128, 1 thread:
    see tests/test_relora.py and docs/benchmarks.md)."""
    n = A.shape[1]
    out = torch.empty(row1 - row0, n, dtype=torch.float32, device=A.device)
    if row1 == row0 or n == 0:
        return out
    A64 = A.detach().to(torch.float64)
    first = row0 - row0 % _DELTA_BLOCK_ROWS
    for s in range(first, row1, _DELTA_BLOCK_ROWS):
        e = min(s + _DELTA_BLOCK_ROWS, B.shape[0])
        block = B[s:e].detach().to(device=A.device, dtype=torch.float64) @ A64
        lo, hi = max(s, row0), min(e, row1)
        out[lo - row0:hi - row0] = block[lo - s:hi - s].mul_(scale)
    return out


def lora_delta(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``scale * B @ A`` as fp32 [out, in] (fp64 GEMMs over fixed row blocks, see _delta_rows)."""
    _check_AB(A, B)
    return _delta_rows(A, B, scale, 0, B.shape[0])


def lora_delta_rows(A: Tensor, B: Tensor, scale: float, row_start: int, row_end: int) -> Tensor:
    """Rows [row_start, row_end) of ``scale * B @ A`` as fp32 [row_end-row_start, in]; bit-identical
    to the same rows of ``lora_delta``."""
    _check_AB(A, B)
    if not 0 <= row_start <= row_end <= B.shape[0]:
        raise ReLoRAConfigError(
            f"row range [{row_start}, {row_end}) is outside [0, {B.shape[0]}]: pass 0 <= start <= end <= out")
    return _delta_rows(A, B, scale, row_start, row_end)


def flat_slice_delta(A: Tensor, B: Tensor, scale: float, flat_start: int, flat_end: int,
                     n_cols: int) -> Tensor:
    """Elements [flat_start, flat_end) of the row-major flattened ``scale * B @ A`` ([out, in], in =
    n_cols) as a 1-D fp32 tensor, computing only the rows that overlap the slice (what a ZeRO-3 rank
    owns is a contiguous slice of the flattened weight).  Bit-identical to the same elements of
    ``lora_delta`` for every slice, so the merged weights do not depend on the partitioning."""
    _check_AB(A, B)
    if A.shape[1] != n_cols:
        raise ReLoRAConfigError(f"n_cols={n_cols} does not match A's in_features={A.shape[1]}: pass n_cols = in_features")
    total = B.shape[0] * n_cols
    if not 0 <= flat_start <= flat_end <= total:
        raise ReLoRAConfigError(
            f"flat range [{flat_start}, {flat_end}) is outside [0, {total}]: pass 0 <= start <= end <= out*in")
    if flat_start == flat_end:
        return torch.zeros(0, dtype=torch.float32, device=A.device)
    row0 = flat_start // n_cols
    row1 = (flat_end - 1) // n_cols + 1
    rows = lora_delta_rows(A, B, scale, row0, row1).reshape(-1)
    off = row0 * n_cols
    return rows[flat_start - off:flat_end - off]


# --------------------------------------------------------------------------------------------------
# Optimizer-state pruning
# --------------------------------------------------------------------------------------------------

def prune_generator(seed: int, restart_index: int, name: str, state_key: str) -> torch.Generator:
    """CPU generator seeded by a stable hash of (seed, restart_index, parameter name, state key)."""
    return _generator(_stable_seed("prune", int(seed), int(restart_index), name, state_key))


def prune_mask(t: Tensor, mode: str, p: float, generator: torch.Generator | None = None,
               threshold_rule: str = "kthvalue") -> Tensor:
    """Keep-mask (bool, shape of ``t``, on ``t.device``) over the FULL tensor; the state is then
    ``t * mask``.

    * ``"zero"``: all False (exact zeroing; the reference's 0.1%-random-keep workaround for
      ZeroRedundancyOptimizer is not needed).
    * ``"random"``: keep where ``U[0,1) > p``, U drawn on CPU from ``generator`` (deterministic when
      the generator comes from prune_generator; the global RNG when None).
    * ``"magnitude"``: keep where ``|t| > thr``, ``thr = magnitude_threshold(t, p, threshold_rule)``
      over the whole tensor. kthvalue: the k-th smallest ``|t|``, ``k = max(1, ceil(p * n))``, so at
      least ``ceil(p*n)`` elements are pruned (exactly that many when |t| has no ties); p = 0
      prunes the minimum (as ``|t| > quantile(|t|, 0)`` does), p = 1 prunes everything.
      quantile: ``torch.quantile(|t|, p)``'s value (the reference's rule), at any size.
    """
    flat = t.reshape(-1)
    thr = magnitude_threshold(flat, p, threshold_rule) if mode == "magnitude" and flat.numel() else None
    return prune_keep(flat, 0, flat.numel(), mode, p, generator, thr).reshape(t.shape)


def magnitude_threshold(full: Tensor, p: float, rule: str = "kthvalue") -> Tensor:
    """Magnitude pruning's threshold over the WHOLE tensor (pruning keeps what lies above it),
    a 0-dim fp32 tensor on ``full``'s device.

    * ``kthvalue``: the k-th smallest ``|full|``, k = max(1, ceil(p * n)).
    * ``quantile``: ``torch.quantile(|full|.float(), p)`` (default linear interpolation), computed
      like ATen's quantile (ranks = p * (n - 1) in fp32, weight = rank - floor(rank), lerp of the two
      neighbouring order statistics), so below 2**24 elements the value is bitwise torch.quantile's;
      above, where torch.quantile refuses, the rank is taken in fp64 (fp32 no longer holds n - 1).
      The upper neighbour is the lower one when it is repeated, else the smallest larger value:
      a count and a min instead of a second selection (2**24 elements, one CPU core: 0.2 s
      against 0.3 s)."""
    check_prune_threshold(rule)
    x = full.detach().reshape(-1).abs().float()
    n = x.numel()
    if rule == "kthvalue":
        return torch.kthvalue(x, max(1, math.ceil(p * n))).values
    rank = torch.tensor(p, dtype=torch.float32 if n <= 1 << 24 else torch.float64) * (n - 1)
    lo = int(rank)  # rank >= 0: truncation is floor, as ATen's ranks.toType(kLong)
    below = torch.kthvalue(x, lo + 1).values
    if lo == n - 1 or float(rank) == lo:
        return below
    # The (lo + 2)-th smallest is `below` again when at least lo + 2 entries are <= it; chosen on
    # the device (no host synchronization per tensor, see relora.steps._magnitude_thresholds).
    above = torch.where((x <= below).sum() >= lo + 2, below, torch.where(x > below, x, torch.inf).min())
    return torch.lerp(below, above, (rank - lo).to(torch.float32).to(x.device))


def prune_keep(fragment: Tensor, start: int, numel: int, mode: str, p: float,
               generator: torch.Generator | None = None, threshold: Tensor | None = None) -> Tensor:
    """prune_mask's decision for elements [start, start + len(fragment)) of a flat tensor of
    ``numel`` elements, made over the WHOLE tensor: the same bits as the matching slice of
    ``prune_mask(full)``. Magnitude needs the whole tensor's ``threshold``
    (magnitude_threshold, either rule); random draws U over all ``numel`` elements and keeps the fragment's
    part; so each rank prunes its own shard."""
    check_prune(mode, p)
    if mode == "zero" or numel == 0:
        return torch.zeros(fragment.shape, dtype=torch.bool, device=fragment.device)
    if mode == "random":
        u = torch.rand(numel, generator=generator, dtype=torch.float32)[start:start + fragment.numel()]
        return (u > p).to(fragment.device)
    if threshold is None:
        raise ReLoRAConfigError("magnitude pruning needs the whole tensor's threshold: pass threshold=")
    return fragment.detach().abs().float() > threshold.to(fragment.device)


# --------------------------------------------------------------------------------------------------
# Rank diagnostics
# --------------------------------------------------------------------------------------------------

def cumulative_rank(r: int, restarts_done: int, out_features: int, in_features: int) -> int:
    """Upper bound on rank(W_now - W_switch), W_switch being the weight when the ReLoRA phase began.

    After ``restarts_done`` resets (merges) the difference is the sum of the ``restarts_done`` merged
    adapters plus the live one, i.e. ``restarts_done + 1`` rank-r terms, so the bound is
    ``min(r * (restarts_done + 1), out_features, in_features)``.
    """
    if r < 1 or restarts_done < 0 or out_features < 1 or in_features < 1:
        raise ReLoRAConfigError(
            f"cumulative_rank(r={r}, restarts_done={restarts_done}, out={out_features}, in={in_features}): "
            f"need r, out, in >= 1 and restarts_done >= 0")
    return min(r * (restarts_done + 1), out_features, in_features)


def effective_rank(delta: Tensor, rtol: float = 1e-4) -> int:
    """Numerical rank of a 2-D tensor: the number of singular values ``s > rtol * s_max``.
    ``rtol`` defaults to 1e-4, well above fp32 round-off (~1e-7 relative) so a fp32 product of
    rank-k factors reports k.  A zero matrix has rank 0.

    The singular values come from the fp64 Gram matrix of the shorter side, ``s^2 = eigvalsh(D D^T)``
    (``D^T D`` when D is tall): the same count as ``torch.linalg.svdvals`` in fp64 for rtol >=
    1e-5, since an eigenvalue of G is accurate to ~1e-16 * s_max^2 and the cut lies at
    rtol^2 * s_max^2 = 1e-8 * s_max^2. One GEMM and a symmetric eigensolver instead of an SVD:
    measured one CPU thread, 1024 x 1024 / 2736 x 1024 / 512 x 1376, see docs/benchmarks.md
    ("Reset diagnostics"). Equal to the svdvals count in tests/test_relora.py."""
    if delta.dim() != 2:
        raise ReLoRAConfigError(f"effective_rank needs a 2-D tensor, got shape {tuple(delta.shape)}")
    if not rtol > 0:
        raise ReLoRAConfigError(f"rtol={rtol!r} is invalid: use rtol > 0 (e.g. 1e-4)")
    if delta.numel() == 0:
        return 0
    d = delta.detach().to(torch.float64)
    gram = d @ d.T if d.shape[0] <= d.shape[1] else d.T @ d
    s2 = torch.linalg.eigvalsh(gram)
    smax2 = s2.max()
    if smax2 <= 0:
        return 0
    return int((s2 > (rtol * rtol) * smax2).sum().item())
