"""Multi-rank scenario for the ZeRO engines' foreach replacements of DeepSpeed's per-gradient loops
(backends/zero_fused.py; tests/test_faults.py): the project's engine against DeepSpeed's own loops
on the same run, e.g. ZeRO-2 under bf16, which skips a step on a non-finite global gradient norm
alone, against DeepSpeed's separate overflow check on the same planted values."""

from __future__ import annotations

import copy

import torch

from relora_dist.trainer import Trainer


def fused_vs_deepspeed(cfg, template, info, plants: dict) -> dict:
    """The same run twice, `plants` ({1-based step: value}) written into one element of the final
    norm weight's gradient on the last rank: once with the project's ZeRO engine, once with
    DeepSpeed's own per-gradient overflow check, norm and copies into the partition (no
    `backends.zero_fused.fuse`). Returns per-step losses and grad norms, the skipped-step count,
    the trainable fp32 masters at the end, and how often each run called DeepSpeed's
    `has_overflow`, `torch._foreach_norm` (inf-norms, 2-norms) and `torch._foreach_copy_`."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from relora_dist.backends import zero_fused

    counts = {"has_overflow": 0, "inf_norms": 0, "two_norms": 0, "copies": 0}
    has_overflow, foreach_norm, foreach_copy = DeepSpeedZeroOptimizer.has_overflow, torch._foreach_norm, torch._foreach_copy_

    def counted_has_overflow(self, *args, **kwargs):
        counts["has_overflow"] += 1
        return has_overflow(self, *args, **kwargs)

    def counted_norm(tensors, ord=2, *args, **kwargs):
        counts["inf_norms" if float(ord) == float("inf") else "two_norms"] += 1
        return foreach_norm(tensors, ord, *args, **kwargs)

    def counted_copy(*args, **kwargs):
        counts["copies"] += 1
        return foreach_copy(*args, **kwargs)

    def run(name: str) -> dict:
        counts.update(has_overflow=0, inf_norms=0, two_norms=0, copies=0)
        c = copy.deepcopy(cfg)
        c.run.output_dir = f"{cfg.run.output_dir}/{name}"
        t = Trainer(c, template, info)
        norm = t.model.model.norm.weight

        def plant(g):
            value = plants.get(t.state.step + 1)
            if value is None or info.rank != info.world_size - 1:
                return None
            g = g.clone()
            g.view(-1)[0] = value
            return g

        norm.register_hook(plant)
        t.train()
        masters = torch.cat([t.backend.shards.gather_fp32(p).flatten().float()
                             for p in t.model.parameters() if p.requires_grad])
        return {"losses": torch.tensor([h["loss"] for h in t.state.history], dtype=torch.float64),
                "grad_norms": torch.tensor([h["grad_norm"] for h in t.state.history], dtype=torch.float64),
                "skipped": t.state.skipped_steps, "masters": masters, **counts}

    patched = counted_has_overflow, counted_norm, counted_copy
    DeepSpeedZeroOptimizer.has_overflow, torch._foreach_norm, torch._foreach_copy_ = patched
    try:
        ours = run("ours")
        fuse = zero_fused.fuse
        zero_fused.fuse = lambda optimizer: None
        try:
            theirs = run("deepspeed")
        finally:
            zero_fused.fuse = fuse
    finally:
        DeepSpeedZeroOptimizer.has_overflow, torch._foreach_norm, torch._foreach_copy_ = has_overflow, foreach_norm, foreach_copy
    return {"ours": ours, "deepspeed": theirs}
