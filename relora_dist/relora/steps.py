"""The ReLoRA steps of a distributed run, one named function each, written once against the
backend contract (relora_dist/backends/base.py):

    wrap (relora.wrap_model) -> switch_to_relora -> [train cycle -> relora_reset:
    merge_adapters -> reinit_adapters -> prune_adapter_moments] * n, LR from schedule.lr_multiplier.

relora.reinit=gradient/project replace the re-init (and, for project, the prune) by relora/reinit_steps.py's.

Paper: Lialin et al., arXiv 2307.05695, §3 (Algorithm 1).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from relora_dist.relora import reinit_steps
from relora_dist.backends.base import Backend
from relora_dist.backends.optimizer_state import ADAM_KEYS
from relora_dist.relora.quant_steps import merge_quantized, quantize_frozen_base
from relora_dist.relora.shard_ops import ASSEMBLE_CHUNK, assemble, full_fp32_masters
from relora_dist.config import Config
from relora_dist.relora.layer import (
    ReLoRALinear,
    cumulative_rank,
    draw_lora_A,
    effective_rank,
    flat_slice_delta,
    freeze_for_relora_phase,
    magnitude_threshold,
    prune_generator,
    prune_keep,
    set_adapters_active,
)


@dataclass
class FrozenMasters:
    """fp32 merge targets of the frozen (wrapped) weights: each rank keeps the `owned_range`
    slice of every W, 1/world of it under ZeRO-2 and ZeRO-3 alike.

    After the switch the frozen W is in no optimizer, so under bf16 it has no fp32 master and every
    merge would round into bf16 (the reference does this; rounding accumulates over resets). Each
    rank keeps an fp32 copy of only its slice, taken from the warm-start engine's fp32 master
    before it is freed, merges s*B*A into it and writes the slice, rounded once, back into the
    compute weights (under ZeRO-2 one all-gather of the bf16 slices rebuilds the replicated W).
    Replicating the masters under ZeRO-2 instead made the ReLoRA phase need MORE memory than
    full-rank training (350m, 8 ranks: 1.66x by the memory model).
    Under fp32 compute the compute weights ARE the master (`alias=True`): no extra memory.
    With merge_precision=bf16 no master is kept and merges go straight into bf16 like the
    reference, so the difference can be measured. `device` "cpu" keeps the masters in (pinned)
    host memory: the accelerator then holds only the bf16 weights and the trainable state.
    """

    shards: dict[str, torch.Tensor] = field(default_factory=dict)
    alias: bool = False
    quant_merge: str = "master"
    """How a quantized base (relora.base_quant) is merged: see quant_steps.merge_quantized."""
    at_switch: dict[str, torch.Tensor] = field(default_factory=dict)
    """W at the switch, for the effective-rank diagnostic: this rank's `owned_range` slice only,
    in fp32 on the CPU so it costs no accelerator memory."""

    @property
    def kept(self) -> bool:
        """Whether separate fp32 masters exist (bf16 compute with fp32 merges)."""
        return bool(self.shards) and not self.alias

    def nbytes(self) -> int:
        """Bytes of the fp32 merge masters on this rank (0 when they alias the compute weights)."""
        return 0 if self.alias else sum(t.numel() * t.element_size() for t in self.shards.values())

    def snapshot_nbytes(self) -> int:
        """Bytes of the W_switch snapshot kept for the effective-rank diagnostic (effective_rank_every=-1 drops it)."""
        return sum(t.numel() * t.element_size() for t in self.at_switch.values())


def _place(t: torch.Tensor, device: str) -> torch.Tensor:
    """A master slice on its configured device: "cpu" = host memory, pinned where an accelerator
    copies from it (pinned pages make the per-reset copies asynchronous-capable and faster)."""
    if device != "cpu":
        return t
    t = t.to("cpu")
    return t.pin_memory() if torch.cuda.is_available() else t


def capture_frozen_masters(backend: Backend, modules: dict[str, ReLoRALinear], relora_cfg, *, compute_fp32: bool,
                           engine_alive: bool) -> FrozenMasters:
    """Take the merge targets at the switch. With a warm-start engine alive (and bf16 compute) the
    fp32 values come from its optimizer master, not from the rounded bf16 module copy."""
    if relora_cfg.merge_precision == "bf16":
        return FrozenMasters(alias=False)
    if compute_fp32 and relora_cfg.base_quant == "none":  # a quantized base needs separate masters
        return FrozenMasters(alias=True)
    shards = {}
    # The masters outlive the engine, so they must carry no autograd history: a copy of its fp32
    # master (a leaf that requires grad) taken with grad enabled keeps, through its CloneBackward
    # node, the engine's WHOLE flat fp32 partition alive: +1,216 MiB of CUDA memory at 350m,
    # world 1 (H200, benchmarks/gpu/), the gap between allocated memory and the engine's tensors.
    with torch.no_grad():
        for name, m in modules.items():
            value = (backend.shards.owned_fp32(m.weight) if engine_alive
                     else backend.shards.owned_view(m.weight).float().clone())
            shards[name] = _place(value, relora_cfg.merge_master_device)
    return FrozenMasters(shards, quant_merge=relora_cfg.quant_merge)


def switch_to_relora(backend: Backend, engine, model: torch.nn.Module, cfg: Config,
                     modules: dict[str, ReLoRALinear], param_groups_fn, *, compute_fp32: bool,
                     phase_backend: Backend | None = None):
    """Full-rank engine -> ReLoRA engine over only the trainable params.

    Flipping requires_grad inside one ZeRO engine is silently wrong (its flat fp32 partitions and
    Adam moments keep moving the frozen weights), so the first engine is torn down completely and
    a second one is built, by `phase_backend` when the ReLoRA phase runs another stage (ZeRO-2 ->
    ZeRO-3: the masters taken from ZeRO-2 are rank_slice slices, which is ZeRO-3's partition).
    Returns (new_engine, FrozenMasters). `engine` may be None (no warm start / --init_from).
    """
    r = cfg.relora
    phase_backend = phase_backend or backend
    masters = None
    if engine is not None and not compute_fp32:
        masters = capture_frozen_masters(backend, modules, r, compute_fp32=compute_fp32, engine_alive=True)
    carried = None
    if engine is not None and r.train_extra and r.carry_optimizer_state != "false" and cfg.optimizer.name == "adamw":
        carried = capture_extra_moments(backend, engine, model, modules)
    if engine is not None:
        backend.teardown_engine(engine)
        del engine
    freeze_for_relora_phase(model, r.train_extra)
    set_adapters_active(model, True)
    if r.base_quant != "none":  # before the engine: it must never see the frozen weights' Parameters
        if masters is None:
            masters = capture_frozen_masters(phase_backend, modules, r, compute_fp32=compute_fp32, engine_alive=False)
        quantize_frozen_base(phase_backend, modules, masters, cfg)
    new_engine = phase_backend.build_engine(model, param_groups_fn(model))
    if carried is not None:
        restore_extra_moments(phase_backend, new_engine, model, *carried)
    if masters is None:
        masters = capture_frozen_masters(phase_backend, modules, r, compute_fp32=compute_fp32, engine_alive=False)
    if r.effective_rank_every >= 0:
        masters.at_switch = {n: _merge_target(phase_backend, m, masters, n).float().cpu().clone()
                             for n, m in modules.items()}
    # Adapter 0: A Kaiming-uniform, B = 0 (the reference's A = B = 0 bug, github.com/Guitaricet/relora/issues/18, must not exist).
    reinit_adapters(phase_backend, modules, cfg.train.seed, restart_index=0)
    return new_engine, masters


def capture_extra_moments(backend: Backend, engine, model: torch.nn.Module,
                          modules: dict[str, ReLoRALinear]) -> tuple[int, dict[str, dict]] | None:
    """(Adam step, {name: {key: full moment on the CPU}}) of every parameter that stays trainable
    after the switch (all but the wrapped base weights and the adapters), read from the warm-start
    engine before it is freed (collective). None before its first step."""
    backend.optimizer_state.link_fragments(engine)
    step = backend.optimizer_state.adam_step(engine)
    if step is None:
        return None
    frozen = {id(p) for m in modules.values() for p in (m.weight, m.bias, m.lora_A, m.lora_B) if p is not None}
    moments = {name: {key: backend.optimizer_state.gather_state(p, key).float().cpu().clone() for key in ADAM_KEYS}
               for name, p in model.named_parameters() if id(p) not in frozen and p.requires_grad}
    return step, moments


def restore_extra_moments(backend: Backend, engine, model: torch.nn.Module, step: int,
                          moments: dict[str, dict]) -> None:
    """Write carried moments into the ReLoRA engine's optimizer, sharded as it wants them. DeepSpeed
    keeps one Adam step per flat group, so the adapters (zero moments) share the carried step: their
    first updates are (1-beta1)/sqrt(1-beta2) = 0.45x a fresh Adam's, inside the first warmup."""
    backend.optimizer_state.init(engine, step)
    for name, p in model.named_parameters():
        if name in moments and p.requires_grad:
            for key, value in moments[name].items():
                backend.optimizer_state.write_state(p, key, value)


def _merge_target(backend: Backend, m: ReLoRALinear, masters: FrozenMasters, name: str) -> torch.Tensor:
    """This rank's `owned_range` slice of the merge target: the fp32 master when kept, else the
    compute weights."""
    return masters.shards[name] if masters.kept else backend.shards.owned_view(m.weight)


def merge_adapters(backend: Backend, modules: dict[str, ReLoRALinear], masters: FrozenMasters) -> int:
    """W <- W + s*B*A on every rank's own `owned_range` slice: each rank computes just its rows of
    B*A (1/world of the merge work, ZeRO-2 included) and writes its slice, rounded once, into the
    compute weights; ZeRO-2 then all-gathers the rounded slices to rebuild its replicated copy.
    Only A and B (fp32 masters, batched into a few all-reduces) and, under ZeRO-2, the
    compute-dtype W travel. Returns the bytes this rank received."""
    moved, finish = 0, None
    for group in _groups(list(modules.items())):
        adapters = full_fp32_masters(backend, [p for _, m in group for p in (m.lora_A, m.lora_B)])
        if backend.world_size > 1:
            moved += sum(t.numel() for t in adapters) * 4
        for j, (name, m) in enumerate(group):
            A = adapters[2 * j].view(m.r, m.in_features)
            B = adapters[2 * j + 1].view(m.out_features, m.r)
            start, end = backend.shards.owned_range(m.weight)
            delta = flat_slice_delta(A, B, m.scale, start, end, m.in_features)
            target = _merge_target(backend, m, masters, name)
            if m.qweight is not None:
                moved += merge_quantized(backend, m, target, delta, A, B, masters.quant_merge)
                continue
            # fp32 master: exact fp32 add. No master (fp32 compute: the weights are the master; or
            # merge_precision=bf16: rounds into bf16 like the reference).
            target.add_(delta.to(device=target.device, dtype=target.dtype))
            if finish is not None:  # the previous W's all-gather ran while this delta was computed
                moved += finish()
            finish = backend.shards.write_owned(m.weight, target)
    return moved + (finish() if finish is not None else 0)


def _groups(items: list[tuple[str, ReLoRALinear]]) -> list[list[tuple[str, ReLoRALinear]]]:
    """Modules in order, grouped so each group's A and B fit one assembly chunk."""
    groups, size = [[]], 0
    for name, m in items:
        n = m.r * (m.in_features + m.out_features)
        if groups[-1] and size + n > ASSEMBLE_CHUNK:
            groups.append([])
            size = 0
        groups[-1].append((name, m))
        size += n
    return [g for g in groups if g]


def reinit_adapters(backend: Backend, modules: dict[str, ReLoRALinear], seed: int, restart_index: int) -> None:
    """A <- Kaiming-uniform drawn from (seed, restart index, module name) — identical on every rank
    and world size without communication — and B <- 0, in the module copy and the fp32 master."""
    for name, m in modules.items():
        A = draw_lora_A(tuple(m.lora_A.shape if m.lora_A.numel() else (m.r, m.in_features)),
                        seed, restart_index, m.relora_name or name)
        backend.shards.write_trainable(m.lora_A, A)
        backend.shards.write_trainable(m.lora_B, torch.zeros(m.out_features, m.r))


def prune_adapter_moments(backend: Backend, modules: dict[str, ReLoRALinear], mode: str, ratio: float,
                          seed: int, restart_index: int, threshold_rule: str = "kthvalue") -> None:
    """Prune the adapters' Adam moments (embeddings/norms/head keep theirs), per tensor.

    Each key's mask is decided over the WHOLE tensor (a magnitude threshold, by either
    `threshold_rule` of magnitude_threshold, must not depend on how ZeRO splits it) and each rank applies its own fragment. A tensor that one rank holds whole
    (under ZeRO-2 all but the few that straddle a partition edge) is pruned by that rank alone;
    only the others are gathered. Gathering every moment instead cost 2 full-size all-reduces per
    tensor and key: 4.6 s of a 7.6 s reset at 350m, r=128, 2 ranks (measured). Random masks come
    from a seeded generator. Deviation from the reference, which prunes exp_avg and exp_avg_sq
    independently: exp_avg is also zeroed wherever exp_avg_sq is pruned. Otherwise an entry can
    keep momentum m with v = 0, and since dL/dA = 0 on the first step after a reset (B = 0) v stays
    0 there, so Adam's update m / (sqrt(v) + eps) is ~1e8 * m: measured as a loss jump of +1.6
    nats after the first reset of the default run."""
    if mode == "none":
        return
    params = [(f"{m.relora_name or name}.{pname}", p) for name, m in modules.items()
              for pname, p in (("lora_A", m.lora_A), ("lora_B", m.lora_B))]
    numels = [backend.shards.numel(p) for _, p in params]
    local = {key: [backend.optimizer_state.local_state(p, key) for _, p in params] for key in ADAM_KEYS}
    # One small collective: does any rank lack optimizer state (no step since the engine was
    # built: nothing to prune), and which tensors does some rank hold whole.
    missing = any(f is None for frags in local.values() for f in frags)
    whole = [f is not None and f[1].numel() == n for f, n in zip(local["exp_avg_sq"], numels)]
    flags = backend.shards.all_reduce_max(torch.tensor([missing, *whole], dtype=torch.float32)).tolist()
    if flags[0]:
        return
    thresholds = (_magnitude_thresholds(backend, local, numels, [bool(f) for f in flags[1:]], ratio, threshold_rule)
                  if mode == "magnitude" else {key: [None] * len(params) for key in ADAM_KEYS})
    for i, (name, p) in enumerate(params):
        keeps = {}
        for key in ADAM_KEYS:
            start, frag = local[key][i]
            if frag.numel():
                keeps[key] = prune_keep(frag, start, numels[i], mode, ratio,
                                        prune_generator(seed, restart_index, name, key), thresholds[key][i])
        if keeps:
            keeps["exp_avg"] = keeps["exp_avg"] & keeps["exp_avg_sq"]
            for key, keep in keeps.items():
                backend.optimizer_state.mask_local_state(p, key, keep)


def _magnitude_thresholds(backend: Backend, local: dict, numels: list[int], whole: list[bool],
                          ratio: float, rule: str = "kthvalue") -> dict[str, torch.Tensor]:
    """Per moment key, every tensor's whole-tensor magnitude threshold, each found by ONE rank:
    the rank holding the tensor whole, else rank j % world, to which the fragments are reduced
    (batched). One all-reduce of the thresholds shares them (each entry is set by exactly one
    rank, the others add 0). Every rank finding every threshold itself cost each rank the k-th
    values of all tensors (1.1 s of a 3.7 s reset at 350m, r=128, ZeRO-3, 2 ranks)."""
    world, rank, n = backend.world_size, backend.rank, len(numels)
    out = {}
    for key in ADAM_KEYS:
        # On the device that holds the moments: a host tensor here made every threshold a
        # device-to-host copy and every mask a copy back, each one a synchronization.
        thr = torch.zeros(n, dtype=torch.float32, device=backend.shards.comm_device)
        held = [j for j, (_, frag) in enumerate(local[key]) if whole[j] and frag.numel() == numels[j]]
        for j, value in _held_thresholds([local[key][j][1] for j in held], ratio, rule):
            thr[held[j]] = value
        mine: list = []
        for owner in range(world):  # all reduces first, so the ranks then find thresholds in parallel
            idx = [j for j in range(n) if not whole[j] and j % world == owner]
            fulls = assemble(backend, [(numels[j], *local[key][j]) for j in idx], dst=owner)
            if rank == owner:
                mine = list(zip(idx, fulls))
        for j, full in mine:
            thr[j] = magnitude_threshold(full, ratio, rule)
        backend.shards.all_reduce_sum_(thr)
        out[key] = thr
    return out


def _held_thresholds(frags: list[torch.Tensor], ratio: float, rule: str, batched: bool | None = None):
    """(index, threshold) of each whole tensor in `frags`. On an accelerator, kthvalue runs as one
    batched `torch.kthvalue` per tensor size (a 350m model's 672 adapter moments come in 2 sizes)
    instead of one call per tensor: the same values (each row's k-th smallest), a few launches
    instead of 672 (the reset's prune took 0.6 s on an H200, host-bound). On the CPU one call per
    tensor stays: batching copies each tensor once more (stack) and measured slower there (350m
    shapes, r=128, one thread: 1.59 s per tensor against 2.38 s batched, CPU time).
    benchmarks/gpu/run_h200.sh times both on the GPU. `batched`: force either way (tests)."""
    if batched is None:
        batched = bool(frags) and frags[0].device.type != "cpu"
    if rule != "kthvalue" or not batched:
        return [(j, magnitude_threshold(f, ratio, rule)) for j, f in enumerate(frags)]
    by_size: dict[int, list[int]] = {}
    for j, f in enumerate(frags):
        by_size.setdefault(f.numel(), []).append(j)
    out = []
    for numel, idx in by_size.items():
        k = max(1, math.ceil(ratio * numel))
        step = max(1, _BATCH_ELEMENTS // max(1, numel))
        for i in range(0, len(idx), step):
            part = idx[i:i + step]
            rows = torch.stack([frags[j].detach().reshape(-1) for j in part]).float().abs_()
            out.extend(zip(part, torch.kthvalue(rows, k, dim=1).values))
    return out


# Elements of one batched threshold call (64 MiB of fp32 |m| copies at most).
_BATCH_ELEMENTS = 1 << 24


def relora_reset(backend: Backend, modules: dict[str, ReLoRALinear], masters: FrozenMasters, cfg: Config,
                 restart_index: int) -> dict[str, float]:
    """One reset: merge, re-init (for adapter `restart_index`, by relora.reinit), prune or project
    the adapters' moments. Returns part timings (s)."""
    r = cfg.relora
    timings = {}
    t0 = time.perf_counter()
    A_old = reinit_steps.full_adapter_A(backend, modules) if r.reinit == "project" else None
    merge_adapters(backend, modules, masters)
    t1 = time.perf_counter()
    if r.reinit == "random":
        reinit_adapters(backend, modules, cfg.train.seed, restart_index)
    else:
        A_new = reinit_steps.gradient_reinit_adapters(backend, modules)
    t2 = time.perf_counter()
    if r.reinit == "project":
        reinit_steps.project_adapter_moments(backend, modules, A_old, A_new)
    else:
        prune_adapter_moments(backend, modules, r.optimizer_reset, r.prune_ratio, cfg.train.seed, restart_index,
                              r.prune_threshold)
    t3 = time.perf_counter()
    timings.update(merge=t1 - t0, reinit=t2 - t1, prune=t3 - t2, total=t3 - t0)
    return timings


def rank_stats(backend: Backend, modules: dict[str, ReLoRALinear], masters: FrozenMasters,
               restarts_done: int, *, measure: bool) -> dict[str, float]:
    """Cumulative rank (sum of r over adapters so far, capped) and, when `measure`, the numerical
    rank of W_now - W_switch including the live adapter. Collective: each rank forms the delta on
    its slice, the slices are all-gathered, and rank 0 alone runs the SVDs."""
    cum = [cumulative_rank(m.r, restarts_done, m.out_features, m.in_features) for m in modules.values()]
    stats = {"cumulative_rank_mean": sum(cum) / len(cum), "cumulative_rank_total": float(sum(cum))}
    if not measure or not masters.at_switch:
        return stats
    ranks = []
    for name, m in modules.items():
        start, end = backend.shards.owned_range(m.weight)
        A, B = backend.shards.gather_fp32(m.lora_A), backend.shards.gather_fp32(m.lora_B)
        now = _merge_target(backend, m, masters, name).to(A.device, torch.float32)  # NCCL gathers device tensors
        local = now - masters.at_switch[name].to(now.device) + flat_slice_delta(
            A, B, m.scale, start, end, m.in_features).to(now.device)
        full = backend.shards.gather_owned(m.weight, local)
        if backend.rank == 0:
            ranks.append(effective_rank(full.view(m.out_features, m.in_features)))
    if ranks:
        stats["effective_rank_mean"] = sum(ranks) / len(ranks)
        stats["effective_rank_min"] = float(min(ranks))
    return stats
