"""The ReLoRA steps of a distributed run, one named function each, written once against the
backend contract (relora_dist/backends/base.py):

    wrap (relora.wrap_model) -> switch_to_relora -> [train cycle -> relora_reset:
    merge_adapters -> reinit_adapters -> prune_adapter_moments] * n, LR from lr_multiplier.

Paper: Lialin et al., arXiv 2307.05695, §3 (Algorithm 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from relora_dist.backends.base import Backend
from relora_dist.config import Config
from relora_dist.relora import (
    ReLoRALinear,
    cumulative_rank,
    draw_lora_A,
    effective_rank,
    flat_slice_delta,
    freeze_for_relora_phase,
    prune_generator,
    prune_mask,
    set_adapters_active,
)
from relora_dist.schedule import is_reset_step, jagged_cosine, warmup_cosine

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class FrozenMasters:
    """fp32 copy of this rank's shard of every frozen (wrapped) weight: the merge target.

    Design (issue "ReLoRA engine", merge precision): after the switch the frozen W is in no
    optimizer, so under bf16 it has no fp32 master and every merge would round into bf16 (the
    reference does this; rounding accumulates over resets). We keep an fp32 copy of exactly the
    shard each rank owns (ZeRO-3: 1/world of W; ZeRO-2: W is replicated, so all of it), taken from
    the warm-start engine's fp32 master before it is freed, and cast it into the compute weights
    after each merge. Cost: 4 bytes per owned frozen element (measured by tools/bench.py).
    Under fp32 compute the compute weights ARE the master (`alias=True`): no extra memory.
    With merge_precision=bf16 no master is kept and merges go straight into bf16 like the
    reference, so the difference can be measured.
    """

    shards: dict[str, torch.Tensor] = field(default_factory=dict)
    alias: bool = False
    at_switch: dict[str, torch.Tensor] = field(default_factory=dict)
    """W at the switch, for the effective-rank diagnostic: this rank's `save_range` slice only
    (1/world of each W under ZeRO-2 and ZeRO-3 alike), in fp32 on the CPU so it costs no
    accelerator memory."""

    def nbytes(self) -> int:
        """Bytes of the fp32 merge masters on this rank (0 when they alias the compute weights)."""
        return 0 if self.alias else sum(t.numel() * t.element_size() for t in self.shards.values())

    def snapshot_nbytes(self) -> int:
        """Bytes of the W_switch snapshot kept for the effective-rank diagnostic (effective_rank_every=-1 drops it)."""
        return sum(t.numel() * t.element_size() for t in self.at_switch.values())


def lr_multiplier(cfg: Config, step: int) -> float:
    """LR multiplier for global step `step` (0-based): warmup+cosine in the warm start, then the
    jagged cosine (restart warmup after each reset) over the ReLoRA phase, or plain warmup+cosine
    for the LoRA baseline (relora.resets=false)."""
    r, s = cfg.relora, cfg.schedule
    # Warmups longer than their phase are clamped to it, so a short debug run (--train.max_steps=4)
    # needs no other overrides.
    if not r.enabled:
        total = cfg.train.max_steps
        return warmup_cosine(step, min(s.warmup_steps, total), total, s.min_lr_ratio)
    if step < r.warm_start_steps:
        return warmup_cosine(step, min(s.warmup_steps, r.warm_start_steps), r.warm_start_steps, s.min_lr_ratio)
    t = step - r.warm_start_steps
    if not r.resets:
        return warmup_cosine(t, min(r.first_warmup, cfg.relora_steps), cfg.relora_steps, s.min_lr_ratio)
    return jagged_cosine(t, cfg.relora_steps, r.first_warmup, r.restart_warmup, r.cycle_length, s.min_lr_ratio)


def reset_due(cfg: Config, step: int) -> bool:
    """Whether a reset follows the optimizer step `step`: the step taken at LR 0 (reference loop
    order: step at LR 0, then merge + re-init + prune, then the restart warmup)."""
    r = cfg.relora
    if not (r.enabled and r.resets) or step < r.warm_start_steps:
        return False
    return is_reset_step(step - r.warm_start_steps, r.cycle_length, cfg.relora_steps)


def capture_frozen_masters(backend: Backend, modules: dict[str, ReLoRALinear], compute_fp32: bool,
                           merge_precision: str, engine_alive: bool) -> FrozenMasters:
    """Take the merge targets at the switch. With a warm-start engine alive (and bf16 compute) the
    fp32 values come from its optimizer master, not from the rounded bf16 module copy."""
    if merge_precision == "bf16":
        return FrozenMasters(alias=False)
    if compute_fp32:
        return FrozenMasters({n: backend.local_view(m.weight) for n, m in modules.items()}, alias=True)
    shards = {}
    for name, m in modules.items():
        if engine_alive:
            shards[name] = backend.local_fp32_master(m.weight)
        else:
            shards[name] = backend.local_view(m.weight).float().clone()
    return FrozenMasters(shards)


def switch_to_relora(backend: Backend, engine, model: torch.nn.Module, cfg: Config,
                     modules: dict[str, ReLoRALinear], param_groups_fn, compute_fp32: bool):
    """Full-rank engine -> ReLoRA engine over only the trainable params.

    Flipping requires_grad inside one ZeRO engine is silently wrong (its flat fp32 partitions and
    Adam moments keep moving the frozen weights), so the first engine is torn down completely and
    a second one is built (shared/notes/deepspeed-on-cpu.md, "Switching"). Returns
    (new_engine, FrozenMasters). `engine` may be None (no warm start / --init_from).
    """
    r = cfg.relora
    if engine is not None and not compute_fp32:
        masters = capture_frozen_masters(backend, modules, compute_fp32, r.merge_precision, True)
    else:
        masters = None
    if engine is not None:
        backend.teardown_engine(engine)
        del engine
    freeze_for_relora_phase(model, r.train_extra)
    set_adapters_active(model, True)
    new_engine = backend.build_engine(model, param_groups_fn(model))
    if masters is None:
        masters = capture_frozen_masters(backend, modules, compute_fp32, r.merge_precision, False)
    if r.effective_rank_every >= 0:
        masters.at_switch = {n: _snapshot_slice(backend, m, masters, n).cpu().clone() for n, m in modules.items()}
    # Adapter 0: A Kaiming-uniform, B = 0 (the reference's A = B = 0 bug, issue #18, must not exist).
    reinit_adapters(backend, modules, cfg.train.seed, restart_index=0)
    return new_engine, masters


def merge_adapters(backend: Backend, modules: dict[str, ReLoRALinear], masters: FrozenMasters) -> int:
    """W <- W + s*B*A on every rank's own shard. Only A and B travel (gathered fp32 masters);
    ZeRO-3 ranks compute just the rows of B*A that overlap their slice of W. Returns bytes moved."""
    moved = 0
    for name, m in modules.items():
        A = backend.full_fp32(m.lora_A)
        B = backend.full_fp32(m.lora_B)
        moved += (A.numel() + B.numel()) * 4
        start, end = backend.local_range(m.weight)
        delta = flat_slice_delta(A, B, m.scale, start, end, m.in_features)
        target = backend.local_view(m.weight)
        if masters.alias:
            target.add_(delta.to(target.dtype))
        elif name in masters.shards:
            master = masters.shards[name]
            master.add_(delta.to(master.device))
            target.copy_(master.to(target.dtype))
        else:  # merge_precision=bf16: round into the compute weights, like the reference
            target.add_(delta.to(target.dtype))
    return moved


def reinit_adapters(backend: Backend, modules: dict[str, ReLoRALinear], seed: int, restart_index: int) -> None:
    """A <- Kaiming-uniform drawn from (seed, restart index, module name) — identical on every rank
    and world size without communication — and B <- 0, in the module copy and the fp32 master."""
    for name, m in modules.items():
        A = draw_lora_A(tuple(m.lora_A.shape if m.lora_A.numel() else (m.r, m.in_features)),
                        seed, restart_index, m.relora_name or name)
        backend.write_trainable(m.lora_A, A)
        backend.write_trainable(m.lora_B, torch.zeros(m.out_features, m.r))


def prune_adapter_moments(backend: Backend, modules: dict[str, ReLoRALinear], mode: str, ratio: float,
                          seed: int, restart_index: int) -> None:
    """Prune the adapters' Adam moments (embeddings/norms/head keep theirs), per tensor.

    Each key's mask is computed over the WHOLE tensor (a magnitude threshold must not depend on
    how ZeRO splits it) and each rank applies its own shard; random masks come from a seeded
    generator. Deviation from the reference, which prunes exp_avg and exp_avg_sq independently:
    exp_avg is also zeroed wherever exp_avg_sq is pruned. Otherwise an entry can keep momentum
    m with v = 0, and since dL/dA = 0 on the first step after a reset (B = 0) v stays 0 there,
    so Adam's update m / (sqrt(v) + eps) is ~1e8 * m: measured as a loss jump of +1.6 nats after
    the first reset of the default run."""
    if mode == "none":
        return
    for name, m in modules.items():
        for pname, p in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            keeps = {}
            for key in ADAM_STATE_KEYS:
                full = backend.full_optimizer_state(p, key)
                if full is None:
                    break
                gen = prune_generator(seed, restart_index, f"{m.relora_name or name}.{pname}", key)
                keeps[key] = prune_mask(full.reshape(-1).float().cpu(), mode, ratio, gen).reshape(full.shape)
            if len(keeps) != len(ADAM_STATE_KEYS):
                continue  # no optimizer state yet (no step taken since the engine was built)
            keeps["exp_avg"] = keeps["exp_avg"] & keeps["exp_avg_sq"]
            for key, keep in keeps.items():
                backend.mask_optimizer_state(p, key, keep)


def relora_reset(backend: Backend, modules: dict[str, ReLoRALinear], masters: FrozenMasters, cfg: Config,
                 restart_index: int) -> dict[str, float]:
    """One reset: merge, re-init (for adapter `restart_index`), prune. Returns part timings (s)."""
    r = cfg.relora
    timings = {}
    t0 = time.perf_counter()
    merge_adapters(backend, modules, masters)
    t1 = time.perf_counter()
    reinit_adapters(backend, modules, cfg.train.seed, restart_index)
    t2 = time.perf_counter()
    prune_adapter_moments(backend, modules, r.optimizer_reset, r.prune_ratio, cfg.train.seed, restart_index)
    t3 = time.perf_counter()
    timings.update(merge=t1 - t0, reinit=t2 - t1, prune=t3 - t2, total=t3 - t0)
    return timings


def _snapshot_slice(backend: Backend, m: ReLoRALinear, masters: FrozenMasters, name: str) -> torch.Tensor:
    """This rank's `save_range` slice of the fp32 merge target (or of the compute weight)."""
    start, end = backend.save_range(m.weight)
    lstart, _ = backend.local_range(m.weight)
    source = masters.shards[name] if (masters.shards and not masters.alias) else backend.local_view(m.weight)
    return source[start - lstart:end - lstart].float()


def rank_stats(backend: Backend, modules: dict[str, ReLoRALinear], masters: FrozenMasters,
               restarts_done: int, measure: bool) -> dict[str, float]:
    """Cumulative rank (sum of r over adapters so far, capped) and, when `measure`, the numerical
    rank of W_now - W_switch including the live adapter. Collective: each rank forms the delta on
    its slice, the slices are all-gathered, and rank 0 alone runs the SVDs."""
    cum = [cumulative_rank(m.r, restarts_done, m.out_features, m.in_features) for m in modules.values()]
    stats = {"cumulative_rank_mean": sum(cum) / len(cum), "cumulative_rank_total": float(sum(cum))}
    if not measure or not masters.at_switch:
        return stats
    ranks = []
    for name, m in modules.items():
        start, end = backend.save_range(m.weight)
        A, B = backend.full_fp32(m.lora_A), backend.full_fp32(m.lora_B)
        now = _snapshot_slice(backend, m, masters, name)
        local = now - masters.at_switch[name].to(now.device) + flat_slice_delta(
            A, B, m.scale, start, end, m.in_features).to(now.device)
        full = backend.gather_flat_slices(local, m.out_features * m.in_features)
        if backend.rank == 0:
            ranks.append(effective_rank(full.view(m.out_features, m.in_features)))
    if ranks:
        stats["effective_rank_mean"] = sum(ranks) / len(ranks)
        stats["effective_rank_min"] = float(min(ranks))
    return stats
