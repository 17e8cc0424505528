"""Reading and pruning bitsandbytes' blockwise 8-bit Adam state (AdamW8bit) by parameter fragment.

AdamW8bit keeps, per stepped tensor of at least 4,096 elements, uint8 codes `state1` (exp_avg,
signed dynamic map `qmap1`) and `state2` (exp_avg_sq, unsigned dynamic map `qmap2`) with one fp32
absmax per block of 256 elements; smaller tensors keep fp32 `state1`/`state2` (bitsandbytes
0.50.2, optim/optimizer.py). Under ZeRO-2 the stepped tensor is a flat partition holding many
parameters, so a parameter's moments are a sub-range of those codes.

Pruning decides on the dequantized moments (bitsandbytes.functional.dequantize_blockwise, the
same arithmetic the optimizer uses) and writes back by setting a pruned entry's code to the map's
exact 0.0 (index 127 of the signed map, 0 of the unsigned one): pruned entries dequantize to exactly
0, kept entries keep their codes bit for bit and no absmax changes.
"""

from __future__ import annotations

import torch

KEYS = {"exp_avg": ("state1", "absmax1", "qmap1"), "exp_avg_sq": ("state2", "absmax2", "qmap2")}
BLOCK = 256  # bitsandbytes' blockwise optimizer-state block
# Everything AdamW8bit keeps per stepped tensor besides `step`: the codes and block scales of both
# moments (qmap1/qmap2 are the fixed dynamic maps, rebuilt by init_state)
STATE8_KEYS = ("state1", "absmax1", "state2", "absmax2")


def dequantize_fragment(state: dict, start: int, numel: int, key: str) -> torch.Tensor:
    """fp32 values of elements [start, start + numel) of moment `key` (a copy)."""
    from relora_dist.relora.quant import bnb

    codes_key, absmax_key, qmap_key = KEYS[key]
    codes = state[codes_key].view(-1)  # ZeRO-2's flat partition, or an FSDP2 shard of any shape
    if codes.dtype != torch.uint8:  # a small tensor: fp32 state
        return codes.narrow(0, start, numel).clone()
    b0, b1 = start // BLOCK, -(-(start + numel) // BLOCK)
    seg = codes[b0 * BLOCK:min(b1 * BLOCK, codes.numel())]
    deq = bnb().functional.dequantize_blockwise(seg, absmax=state[absmax_key][b0:b1], code=state[qmap_key],
                                                blocksize=BLOCK)
    off = start - b0 * BLOCK
    return deq[off:off + numel].float()


def mask_fragment(state: dict, start: int, numel: int, key: str, keep: torch.Tensor) -> None:
    """Zero the entries of [start, start + numel) of moment `key` where `keep` is False, in place."""
    codes_key, _, qmap_key = KEYS[key]
    codes = state[codes_key].view(-1)
    view = codes.narrow(0, start, numel)
    keep = keep.to(device=view.device, dtype=torch.bool)
    if codes.dtype != torch.uint8:
        view.mul_(keep.to(view.dtype))
        return
    zero = (state[qmap_key] == 0).nonzero()
    if zero.numel() != 1:
        raise RuntimeError(f"the 8-bit map of {key} has no unique exact 0.0: cannot prune to exactly zero")
    view[~keep] = zero.item()


def full_flat(state: dict, key: str) -> torch.Tensor:
    """fp32 values of the whole stepped tensor's moment `key` (a copy)."""
    return dequantize_fragment(state, 0, state[KEYS[key][0]].numel(), key)


def quantize_into(state: dict, key: str, values: torch.Tensor) -> None:
    """Set moment `key` of the whole stepped tensor from fp32 `values` (bitsandbytes'
    quantize_blockwise with the optimizer's own map, absmax and block)."""
    from relora_dist.relora.quant import bnb

    codes_key, absmax_key, qmap_key = KEYS[key]
    codes = state[codes_key].view(-1)
    if codes.dtype != torch.uint8:
        codes.copy_(values.reshape(-1))
        return
    q, qs = bnb().functional.quantize_blockwise(values.contiguous(), code=state[qmap_key], blocksize=BLOCK)
    # bitsandbytes' CPU quantizer maps 0.0 to a neighbouring code (measured: 9.4e-11 instead of 0 for
    # exp_avg_sq), so pruned entries are set to the map's exact 0 again.
    q[values == 0] = int((state[qmap_key] == 0).nonzero().item())
    codes.copy_(q.reshape(-1))
    state[absmax_key].copy_(qs.absmax)
