"""Batched collectives over the backend contract, shared by the ReLoRA steps (relora/steps.py) and
the re-init steps (relora/reinit_steps.py): whole tensors assembled from every rank's fragments in a few
large collectives instead of one per tensor."""

from __future__ import annotations

import torch

from relora_dist.backends.base import Backend


# Elements per collective when assembling split tensors (256 MiB of fp32 temporaries at most).
ASSEMBLE_CHUNK = 1 << 26


def assemble(backend: Backend, items: list[tuple[int, int, torch.Tensor]],
             dst: int | None = None) -> list[torch.Tensor]:
    """Full flat tensors from every rank's (numel, start, fragment), batched: each rank writes its
    fragments into one zero buffer and a SUM all-reduce (or a reduce to `dst`, the only rank whose
    result is then valid) completes it; every element has exactly one owner, so the sum is exact.
    A few large collectives instead of one per tensor (ZeRO-3 splits every tensor over all ranks).
    Collective: every rank passes the same numels."""
    out, pos = [], 0
    while pos < len(items):
        end, total = pos, 0
        while end < len(items) and (end == pos or total + items[end][0] <= ASSEMBLE_CHUNK):
            total += items[end][0]
            end += 1
        buf = torch.zeros(total, dtype=torch.float32, device=backend.shards.comm_device)
        offset = 0
        for numel, start, frag in items[pos:end]:
            buf[offset + start:offset + start + frag.numel()] = frag.to(buf)
            offset += numel
        backend.shards.all_reduce_sum_(buf, dst)
        offset = 0
        for numel, _, _ in items[pos:end]:
            out.append(buf[offset:offset + numel])
            offset += numel
        pos = end
    return out


def full_fp32_masters(backend: Backend, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Full fp32 optimizer masters of trainable params, flat, assembled in a few collectives
    (DeepSpeed's per-param getter is one full-size all-reduce each: 336 of them per reset at 350m)."""
    items = []
    for p in params:
        start, _, frag = backend.shards.fp32_fragment(p)
        items.append((backend.shards.numel(p), start, frag if frag is not None else torch.zeros(0)))
    return assemble(backend, items)
