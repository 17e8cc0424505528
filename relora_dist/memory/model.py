"""Analytic per-rank memory of the training state under DeepSpeed ZeRO-2/3 and FSDP2, both phases.

What one rank holds between forward passes, in bytes (activations, communication buckets and
allocator slack are NOT modelled):

| item | ZeRO-2 | ZeRO-3 | FSDP2 |
|---|---|---|---|
| params (all: trainable, frozen, adapters) | N x b (replicated) | N x b / world | N x 4 / world (fp32 shards) |
| gradients of trainable params (partition) | T x b / world | T x b / world | T x 4 / world |
| fp32 master of trainable params (a copy even with fp32 compute) | T x 4 / world | T x 4 / world | 0 (the shards) |
| Adam moments (exp_avg, exp_avg_sq) | T x 8 / world | T x 8 / world | T x 8 / world |
| fp32 merge masters of frozen wrapped W (ReLoRA, bf16 compute) | W x 4 / world | W x 4 / world | 0 (the shards) |

FSDP2 (one sharded unit per decoder layer; under bf16 a mixed-precision policy with bf16 compute
params and fp32 reductions, backends/fsdp2.py) keeps every param as an fp32 row shard: those shards are the optimizer's masters AND
the frozen weights' merge masters, so nothing is kept beside them, and its sharded grads are fp32
too. The bf16 copies exist only while a layer is unsharded in forward/backward (transient, like
activations: not modelled). FSDP2 pads rows (ceil(rows / world) x cols per rank), modelled as
ceil(numel / world): the same wherever the world size divides the row count (every preset at 2, 8
and 64 ranks).

b = 2 (bf16 compute) or 4 (fp32). N counts the adapters whenever the model is wrapped (this system
wraps before the first engine, so its warm start holds frozen adapters too); T is the trainable
count of the phase: all base params in the full-rank phase, adapters (+ embeddings, norms, lm_head
and unwrapped linears with relora.train_extra) in the ReLoRA phase; the biases of wrapped linears
(Qwen2's q/k/v) train in the full-rank phase and stay frozen, without merge masters, in ReLoRA.
ZeRO-3 pads each tensor to a multiple of the world size (modelled per tensor); ZeRO-2 alignment
padding is ignored (< world x 16 elements per group).

Tensor shapes come from the model's config (`Shape.of_config`): grouped-query k/v projections are
hidden x (num_key_value_heads x head_dim), a tied lm_head is no tensor of its own, and biases are
counted where the model type has them.

Merge masters: each rank keeps fp32 of only its 1/world flat slice of every frozen W (ceil(numel /
world), the partition ZeRO-3 uses) under both stages; ZeRO-2 rebuilds its replicated bf16 W by an
all-gather per reset. `shard_merge_masters=False` gives the older ZeRO-2 layout (a full fp32 copy
on every rank), which older bench JSONs measured. `master_device="cpu"` moves them to host memory:
they are reported as `host_merge_masters`, outside the accelerator-resident `total` (`total_with_host`
adds them). With fp32 compute the masters alias the weights (0 bytes); merge_precision=bf16 keeps
none.

These are exactly the tensors tools/bench.py counts (validated there: `tools/memory_model.py
validate`), so the model is checked at world 2 and extrapolated to 8 / 64 ranks and large presets.

Phases: ``full_rank`` = plain full-rank training (no adapters: the baseline a ReLoRA run is
compared with), ``warm_start`` = this system's full-rank phase (adapters allocated, frozen),
``relora`` = the ReLoRA phase.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relora_dist.relora import layer as relora
from relora_dist.model import PRESETS

PHASES = ("full_rank", "warm_start", "relora")
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2 + 8 / 256}  # per trainable element
CATEGORIES = ("params", "grads", "fp32_master", "optimizer_state", "merge_masters")  # on the accelerator
HOST_CATEGORIES = ("host_merge_masters",)
MASTER_DEVICES = ("device", "cpu")
GIB = 2**30
MIB = 2**20
DEFAULT_TARGETS = tuple(relora.DEFAULT_TARGETS)
# Targets for the ReLoRA-phase / full-rank ratio at 350m, bf16, r=128, vocab 32k, 8 ranks: the keys
# are the columns of `options_table`.
TARGET_CASE = {"preset": "350m", "world": 8, "compute": "bf16", "r": 128, "vocab": 32000, "train_extra": True}
TARGETS = {"sharded": 0.90, "host": 0.80, "phase_stage_3": 0.65, "zero3": 0.65}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    targets: tuple[str, ...] = DEFAULT_TARGETS  # relora.targets: regexes over Linear module names
    q_dim: int = 0  # heads x head_dim, the q projection's rows (0: hidden)
    kv_dim: int = 0  # num_key_value_heads x head_dim, the k and v projections' rows (0: q_dim, no GQA)
    bias: tuple[str, ...] = ()  # projections with a bias, e.g. ("q_proj", "k_proj", "v_proj") for Qwen2
    tied: bool = False  # tie_word_embeddings: lm_head is the embedding, no tensor of its own

    @classmethod
    def of(cls, preset: str, vocab: int = 32000, layers: int = 0) -> "Shape":
        p = PRESETS[preset]
        return cls(p.hidden_size, p.intermediate_size, layers or p.num_layers, vocab)

    @classmethod
    def of_config(cls, config, targets: tuple[str, ...] = DEFAULT_TARGETS) -> "Shape":
        """The shape of a transformers config of the LLaMA layout (a preset's LlamaConfig or an
        init_from folder's config.json): grouped-query k/v projections (num_key_value_heads x
        head_dim rows), an explicit head_dim, biases as the model type's modeling code creates them
        (Qwen2: q/k/v always; LLaMA: attention_bias on q/k/v/o, mlp_bias on gate/up/down), tying."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        bias: tuple[str, ...] = ()
        if config.model_type == "qwen2":
            bias = ("q_proj", "k_proj", "v_proj")
        elif getattr(config, "attention_bias", False):
            bias = ("q_proj", "k_proj", "v_proj", "o_proj")
        if getattr(config, "mlp_bias", False):
            bias += ("gate_proj", "up_proj", "down_proj")
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size,
                   tuple(targets), heads * head_dim, kv_heads * head_dim, bias,
                   bool(getattr(config, "tie_word_embeddings", False)))

    def linears(self) -> list[tuple[str, int, int]]:
        """(module name, out_features, in_features) of every nn.Linear, named as in LlamaForCausalLM
        (no lm_head when tied)."""
        h, i = self.hidden, self.intermediate
        q = self.q_dim or h
        kv = self.kv_dim or q
        attn = [("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
                ("self_attn.o_proj", h, q)]
        mlp = [("mlp.gate_proj", i, h), ("mlp.up_proj", i, h), ("mlp.down_proj", h, i)]
        out = [(f"model.layers.{layer}.{name}", out_f, in_f)
               for layer in range(self.layers) for name, out_f, in_f in attn + mlp]
        return out if self.tied else out + [("lm_head", self.vocab, h)]

    def tensors(self, r: int) -> dict[str, list[int]]:
        """Element counts per tensor, by role: wrapped (frozen in ReLoRA), adapters, frozen (the
        biases of wrapped linears: trainable in the full-rank phase, frozen in ReLoRA, no merge
        master), extra (embeddings, norms and unwrapped linears such as lm_head, with their biases:
        trainable in ReLoRA iff train_extra)."""
        rx = [re.compile(t) for t in self.targets]
        wrapped, adapters, frozen, extra = [], [], [], [self.vocab * self.hidden]  # embed_tokens
        for name, out_f, in_f in self.linears():
            bias = [out_f] if name.rsplit(".", 1)[-1] in self.bias else []
            if any(x.search(name) for x in rx):
                wrapped.append(out_f * in_f)
                adapters += [r * in_f, out_f * r]
                frozen += bias
            else:
                extra += [out_f * in_f] + bias
        extra += [self.hidden] * (2 * self.layers + 1)  # input/post-attention norms, final norm
        return {"wrapped": wrapped, "adapters": adapters, "frozen": frozen, "extra": extra}

    def counts(self, r: int) -> dict[str, int]:
        return {k: sum(v) for k, v in self.tensors(r).items()}


def _per_rank(sizes: list[int], world: int, sharded: bool) -> float:
    """Elements this rank holds of these tensors (ZeRO-3: ceil(numel / world) each)."""
    if not sharded:
        return float(sum(sizes))
    return float(sum(-(-n // world) for n in sizes))


ENGINES = (2, 3, "fsdp2")  # ZeRO stages and FSDP2, as `stage` arguments name them


def _check(phase: str, stage: int | str, compute: str, master_device: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}: use one of {PHASES}")
    if stage not in ENGINES:
        raise ValueError(f"stage {stage}: use 2, 3 (ZeRO) or fsdp2")
    if compute not in ("bf16", "fp32"):
        raise ValueError(f"compute {compute!r}: use bf16 or fp32")
    if master_device not in MASTER_DEVICES:
        raise ValueError(f"master_device {master_device!r}: use one of {MASTER_DEVICES}")


def merge_master_bytes(shape: Shape, world: int, stage: int, *, compute: str = "bf16", r: int = 128,
                       merge_precision: str = "fp32", shard_merge_masters: bool = True) -> float:
    """fp32 merge masters per rank in the ReLoRA phase. Only bf16 compute with fp32 merges keeps
    them: under fp32 the compute weights are the master, and bf16 merges have none. FSDP2 never
    keeps any: its fp32 shards are the masters."""
    if compute != "bf16" or merge_precision != "fp32" or stage == "fsdp2":
        return 0.0
    wrapped = shape.tensors(r)["wrapped"]
    return _per_rank(wrapped, world, stage == 3 or shard_merge_masters) * 4


def per_rank_bytes(shape: Shape, world: int, stage: int, phase: str, *, compute: str = "bf16", r: int = 128,
                   train_extra: bool = True, merge_precision: str = "fp32", shard_merge_masters: bool = True,
                   master_device: str = "device", optimizer: str = "adamw") -> dict[str, float]:
    """Bytes per rank by category, 'total' (accelerator-resident) and 'total_with_host'.
    `shard_merge_masters=False`: ZeRO-2's former replicated fp32 masters (ZeRO-3 always shards).
    `optimizer="adamw8bit"`: bitsandbytes' blockwise state, 2 bytes of moments per trainable
    element + 2 fp32 absmax per 256, instead of AdamW's 8."""
    _check(phase, stage, compute, master_device)
    fsdp2 = stage == "fsdp2"
    b = 4 if fsdp2 else 2 if compute == "bf16" else 4  # FSDP2's shards and grads stay fp32 under bf16
    t = shape.tensors(r)
    sharded = stage != 2
    present = t["wrapped"] + t["frozen"] + t["extra"] + (t["adapters"] if phase != "full_rank" else [])
    if phase == "relora":
        trainable = t["adapters"] + (t["extra"] if train_extra else [])
    else:
        trainable = t["wrapped"] + t["frozen"] + t["extra"]
    # Trainable partitions: ZeRO-2 flattens a group and splits it evenly; ZeRO-3 splits per tensor.
    part = _per_rank(trainable, world, True) if sharded else sum(trainable) / world
    masters = 0.0
    if phase == "relora":
        masters = merge_master_bytes(shape, world, stage, compute=compute, r=r, merge_precision=merge_precision,
                                     shard_merge_masters=shard_merge_masters)
    on_host = master_device == "cpu"
    out = {
        "params": _per_rank(present, world, sharded) * b,
        "grads": part * b,
        # ZeRO: a separate copy even under fp32 (measured, DeepSpeed 0.19.8); FSDP2: the shards themselves
        "fp32_master": 0.0 if fsdp2 else part * 4,
        "optimizer_state": part * (OPTIMIZER_STATE_BYTES[optimizer]),
        "merge_masters": 0.0 if on_host else masters,
        "host_merge_masters": masters if on_host else 0.0,
    }
    out["total"] = sum(out[c] for c in CATEGORIES)
    out["total_with_host"] = out["total"] + out["host_merge_masters"]
    return out


def ratio(shape: Shape, world: int, stage: int, *, baseline: str = "full_rank", relora_stage: int | None = None,
          **kw) -> float:
    """Accelerator-resident ReLoRA-phase bytes / `baseline`-phase bytes per rank. `relora_stage=3`
    with stage 2: the ReLoRA phase runs under ZeRO-3 after a ZeRO-2 warm start (relora.phase_stage=3)."""
    return (per_rank_bytes(shape, world, relora_stage or stage, "relora", **kw)["total"]
            / per_rank_bytes(shape, world, stage, baseline, **kw)["total"])


def zero2_options(shape: Shape, world: int, **kw) -> dict[str, float]:
    """ReLoRA-phase / full-rank ratios of the ways to run a ZeRO-2 job's ReLoRA phase, and ZeRO-3 and
    FSDP2 (each over its own full-rank phase)."""
    host = dict(kw, master_device="cpu")
    full2 = per_rank_bytes(shape, world, 2, "full_rank", **kw)["total"]
    return {
        "replicated": ratio(shape, world, 2, shard_merge_masters=False, **kw),
        "sharded": ratio(shape, world, 2, **kw),
        "host": ratio(shape, world, 2, **host),
        "host_with_host": per_rank_bytes(shape, world, 2, "relora", **host)["total_with_host"] / full2,
        "phase_stage_3": ratio(shape, world, 2, relora_stage=3, **kw),
        "zero3": ratio(shape, world, 3, **kw),
        "fsdp2": ratio(shape, world, "fsdp2", **kw),
    }


# ------------------------------------------------------------------------------------------------
# Memory plan of one run (launchers/pretrain.py --dry_run)
# ------------------------------------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def plan(shape: Shape, world: int, stage: int, *, compute: str, r: int, train_extra: bool, merge_precision: str,
         master_device: str, phase_stage: str, relora: bool, warm_start: bool) -> list[str]:
    """A few lines: per-rank bytes of each phase this run has, a warning when the ReLoRA phase
    holds more than the full-rank one, and a hint when ZeRO-3 for the ReLoRA phase would hold less."""
    kw = dict(compute=compute, r=r, train_extra=train_extra, merge_precision=merge_precision)
    engine = "FSDP2" if stage == "fsdp2" else f"ZeRO-{stage}"
    kv = shape.kv_dim or shape.q_dim or shape.hidden
    gqa = f", k/v {kv}" if kv != (shape.q_dim or shape.hidden) else ""
    what = (f"{world} rank{'s' if world > 1 else ''}, {engine}, {compute}, hidden {shape.hidden}{gqa}, "
            f"{shape.layers} layers, vocab {shape.vocab}{', tied' if shape.tied else ''}")
    if not relora:
        full = per_rank_bytes(shape, world, stage, "full_rank", **kw)["total"]
        return [f"memory plan per rank (training state, activations not included; {what}): full-rank {fmt_bytes(full)}"]
    # Without a warm start there is no full-rank phase: compare with plain full-rank training.
    base_phase = "warm_start" if warm_start else "full_rank"
    full = per_rank_bytes(shape, world, stage, base_phase, **kw)["total"]
    rel_stage = 3 if phase_stage == "3" and stage == 2 else stage
    rel = per_rank_bytes(shape, world, rel_stage, "relora", master_device=master_device, **kw)
    host = rel["host_merge_masters"]
    host = f" + {fmt_bytes(host)} fp32 merge masters in host memory" if host else ""
    label = "full-rank warm start" if warm_start else "full-rank training (not run: warm_start_steps=0)"
    lines = [f"memory plan per rank (training state, activations not included; {what}, r={r}): {label} "
             f"{fmt_bytes(full)}, ReLoRA phase{' (ZeRO-3)' if rel_stage != stage else ''} {fmt_bytes(rel['total'])}"
             f"{host}"]
    if rel["total"] > full:
        why = ("ZeRO-2 keeps every frozen weight and the adapters replicated" if rel_stage == 2
               else "the adapters and their optimizer state outweigh what freezing saves")
        lines.append(f"warning: the ReLoRA phase needs {rel['total'] / full:.2f}x the memory of full-rank training "
                     f"per rank ({why})")
    if rel_stage == 2:
        z3 = per_rank_bytes(shape, world, 3, "relora", master_device=master_device, **kw)["total"]
        if z3 < rel["total"]:
            lines.append(f"hint: --relora.phase_stage=3 would hold {fmt_bytes(z3)} per rank in the ReLoRA phase "
                         f"(frozen weights sharded 1/{world}; costs parameter all-gathers each step)")
    return lines
