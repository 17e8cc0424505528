"""What a checkpoint saves and a resume restores, as components (torchtitan's pattern): each has
state_dict()/load_state_dict(), or for the sharded tensors fragments()/load_fragments(). format.py,
resume.py and export.py take these objects, never the Trainer, so saving, loading and exporting see
exactly the same set:

    ModelState     module params, the optimizer's fp32 masters and Adam moments, the fp32 merge
                   masters and W_switch of the frozen wrapped weights (sharded: one fragment per rank)
    TrainState     step, tokens seen, phase, restart index, skipped steps; the LR schedule position
    RNGState       the global torch RNGs of this rank
    ReLoRAState    adapter layout (r, alpha, targets, wrapped modules) and cumulative rank
    the loader     data/loader.BlockLoader's position (it has its own state_dict)

The Trainer rebuilds the set on demand (Trainer.checkpoint_state): the switch to the ReLoRA phase
replaces the engine, backend and masters, so a set held from before would point at freed ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from relora_dist.backends.optimizer_state import ADAM_KEYS

# Name prefix, in a rank's file, of the optimizer state OptimizerState.exact_local_state returns.
EXACT = "exact_state/"

@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done (global; engines restart their own counters, so we keep ours)."""
    restart_index: int = 0
    """Resets done in the ReLoRA phase (= index of the live adapter)."""
    tokens_seen: int = 0
    phase: str = "full_rank"
    history: list[dict] = field(default_factory=list)
    """Per-step logged records (loss, lr, ...) kept for tests and summaries."""
    evals: list[dict] = field(default_factory=list)
    """Every evaluation {step, eval_loss, eval_ppl}, including the one before training."""
    stopped: bool = False
    """True when the run stopped early on SIGTERM (after saving a checkpoint)."""
    skipped_steps: int = 0
    """Steps whose loss or gradient norm was non-finite, so no update was applied (train.on_nonfinite=skip)."""
    skipped_in_a_row: int = 0
    """Consecutive such steps up to now (the run stops past train.max_skipped_steps)."""

    def state_dict(self) -> dict:
        """The manifest's counters. The LR is a function of the step (relora/schedule.py), so the step is
        the scheduler's whole state; last_lr is recorded for people reading the manifest."""
        return {"global_step": self.step, "phase": self.phase, "restart_index": self.restart_index,
                "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
                "skipped_in_a_row": self.skipped_in_a_row,
                "lr_schedule": {"step": self.step, "last_lr": self.history[-1]["lr"] if self.history else 0.0}}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.tokens_seen, self.restart_index, self.phase = (
            sd["global_step"], sd["tokens_seen"], sd["restart_index"], sd["phase"])
        self.skipped_steps = int(sd.get("skipped_steps", 0))  # absent in checkpoints of older versions
        # a resume inside a skip streak goes on counting it: a reset counter let a run that had
        # collapsed to non-finite steps finish with exit 0
        self.skipped_in_a_row = int(sd.get("skipped_in_a_row") or 0)


class RNGState:
    """The global torch RNGs of this rank (adapter dropout; anything DeepSpeed draws). Saved in the
    rank's own shard file, as tensors: a resume at another world size takes rank 0's."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"rng/cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            sd["rng/cuda"] = torch.cuda.get_rng_state()
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor | None]) -> None:
        if sd.get("rng/cpu") is not None:
            torch.set_rng_state(sd["rng/cpu"])
        if sd.get("rng/cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(sd["rng/cuda"])


@dataclass
class ReLoRAState:
    """The adapter layout and the ReLoRA counters a manifest records. The restart index itself is
    TrainState's (the loop advances it with the step); this derives the cumulative rank from it."""

    r: int
    alpha: float
    targets: list[str]
    modules: dict  # name -> ReLoRALinear
    progress: TrainState
    stats: Callable[[], dict] = dict
    """The unmeasured rank statistics (Trainer.rank_stats(measure=False)): no communication."""

    def state_dict(self) -> dict:
        from relora_dist.relora.layer import cumulative_rank

        active = self.progress.phase == "relora"
        cum = {n: cumulative_rank(m.r, self.progress.restart_index, m.out_features, m.in_features)
               for n, m in self.modules.items()} if active else {}
        return {"cumulative_rank": {"per_module": cum, "total": sum(cum.values())},
                "relora": {"r": self.r, "alpha": self.alpha, "targets": self.targets,
                           "wrapped_modules": sorted(self.modules)},
                "adapters_active": active, "rank_stats": self.stats()}

    def compatibility_problem(self, sd: dict) -> str | None:
        """Why a checkpoint's adapters cannot load here (another r or set of wrapped modules): the
        counters need no loading (they follow from TrainState), the layout must match."""
        if sd["phase"] != "relora":
            return None
        theirs = sd["relora"]
        if theirs["r"] == self.r and theirs["wrapped_modules"] == sorted(self.modules):
            return None
        return (f"adapters r={theirs['r']} over {len(theirs['wrapped_modules'])} modules but this run has "
                f"r={self.r} over {len(self.modules)}; keep relora.r and relora.targets")


@dataclass
class ModelState:
    """Everything sharded across ranks, through the backend contract (backends/base.py): module
    params, the optimizer's fp32 masters and Adam moments, the merge masters and W_switch.

    Each rank writes only the flat ranges it owns (`fragments`) and reads back only its own slices
    of the full tensors (`load_fragments`), so any world size and ZeRO stage can load any checkpoint.
    """

    backend: Any
    engine: Any | None
    model: torch.nn.Module
    modules: dict = field(default_factory=dict)  # name -> ReLoRALinear
    masters: Any | None = None  # relora.steps.FrozenMasters in the ReLoRA phase

    def adam_step(self) -> int | None:
        """Adam's step counter (None before the first step or with no engine)."""
        return self.backend.optimizer_state.adam_step(self.engine) if self.engine is not None else None

    # --- saving (no communication) -----------------------------------------------------------------
    def fragments(self) -> tuple[dict[str, torch.Tensor], dict]:
        """This rank's tensors for its safetensors file, and the index of what they are:
        {param: {field: [flat start, flat end]}}."""
        backend, engine, masters = self.backend, self.engine, self.masters
        if engine is not None:
            backend.optimizer_state.link_fragments(engine)
        tensors: dict[str, torch.Tensor] = {}
        index: dict[str, dict] = {}

        def put(name: str, fld: str, start: int, frag: torch.Tensor | None) -> None:
            if frag is None or frag.numel() == 0:
                return
            tensors[f"{name}/{fld}"] = frag.detach().reshape(-1).contiguous().cpu().clone()
            index.setdefault(name, {})[fld] = [start, start + frag.numel()]

        module_of = {f"{n}.weight": n for n in self.modules}
        for name, p in self.model.named_parameters():
            if p.requires_grad and engine is not None:
                start, _, frag = backend.shards.fp32_fragment(p)
                put(name, "master", start, frag)
                for key in ADAM_KEYS:
                    put(name, key, start, backend.optimizer_state.state_fragment(p, key))
            else:
                put(name, "weight", backend.shards.owned_range(p)[0], backend.shards.owned_view(p))
            module = module_of.get(name)
            if module is not None and masters is not None:
                start, _ = backend.shards.owned_range(p)  # masters and W_switch hold exactly this range
                if masters.kept:
                    put(name, "merge_master", start, masters.shards[module])
                if masters.at_switch:
                    put(name, "w_switch", start, masters.at_switch[module])
        for module, m in self.modules.items():
            # A quantized base is no Parameter: its fp32 master is what is saved (never the quantized
            # bytes), so a resume requantizes exactly and any world size / quantization setting can load it.
            if m.qweight is not None:
                start, _ = backend.shards.owned_range(m.weight)
                put(f"{module}.weight", "merge_master", start, masters.shards[module])
                if masters.at_switch:
                    put(f"{module}.weight", "w_switch", start, masters.at_switch[module])
        if engine is not None:  # outside the index, like the RNG: this rank's partition only
            for key, t in backend.optimizer_state.exact_local_state(engine).items():
                tensors[f"{EXACT}{key}"] = t.detach().contiguous().cpu().clone()
        return tensors, index

    def tensor_meta(self) -> dict[str, dict]:
        """Every tensor's whole shape and dtype, whichever rank holds which part of it."""
        backend = self.backend
        meta = {name: {"shape": list(backend.shards.shape(p)),
                       "dtype": str(backend.shards.storage_dtype(p)).replace("torch.", ""),
                       "trainable": bool(p.requires_grad)}
                for name, p in self.model.named_parameters()}
        for module, m in self.modules.items():
            if m.qweight is not None:  # stored as its fp32 master
                meta[f"{module}.weight"] = {"shape": [m.out_features, m.in_features], "dtype": "float32",
                                            "trainable": False, "base_quant": m.qweight.kind}
        return meta

    # --- loading -----------------------------------------------------------------------------------
    def load_fragments(self, reader, adam_step: int | None, after_weights: Callable[[], None] = lambda: None) -> None:
        """Params, fp32 masters, merge masters and (with `adam_step`) Adam moments from a
        checkpoint.ShardReader: every rank reads the full tensors it needs and keeps its own slice.
        `after_weights` runs once the weights are in, before the optimizer state."""
        from relora_dist.relora.quant_steps import requantize_all

        backend, engine, masters = self.backend, self.engine, self.masters
        frozen_fields = ("merge_master", "weight", "master")
        for name, p in self.model.named_parameters():
            if p.requires_grad and engine is not None:
                fld = "master" if reader.has(name, "master") else \
                    "merge_master" if reader.has(name, "merge_master") else "weight"
                backend.shards.write_trainable(p, reader.full(name, fld).float())
            else:
                fld = next(f for f in frozen_fields if reader.has(name, f) or f == "master")
                backend.shards.write_frozen(p, reader.full(name, fld))
        if masters is not None:
            for module, mod in self.modules.items():
                name = f"{module}.weight"
                # Fields hold full tensors whatever layout wrote them (replicated or sharded masters,
                # any world size): each rank copies out its own slice, in place (keeps pinned host memory).
                if masters.kept:
                    fld = "merge_master" if reader.has(name, "merge_master") else "weight"
                    masters.shards[module].copy_(backend.shards.owned_slice(mod.weight, reader.full(name, fld).float()))
                if reader.has(name, "w_switch") and masters.at_switch:
                    masters.at_switch[module] = backend.shards.owned_slice(
                        mod.weight, reader.full(name, "w_switch").float()).clone()
        if masters is not None and any(mod.qweight is not None for mod in self.modules.values()):
            requantize_all(backend, self.modules, masters)
        after_weights()
        if engine is not None and adam_step is not None:
            backend.optimizer_state.init(engine, int(adam_step))
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    for key in ADAM_KEYS:
                        if reader.has(name, key):
                            backend.optimizer_state.write_state(p, key, reader.full(name, key))
            backend.optimizer_state.finish_writes()
            # Same world size and engine: the partition is the same, so state the per-parameter
            # fields restore only approximately (8-bit Adam) is copied back bit for bit.
            m = reader.manifest
            if m.get("world_size") == backend.world_size and m.get("backend", backend.name) == backend.name:
                backend.optimizer_state.load_exact_local_state(engine, reader.rank_tensors(backend.rank, EXACT))


@dataclass
class CheckpointState:
    """The component set a checkpoint saves and a resume restores, with what the manifest records
    about the run around them (its config, tokenizer, model config, precision, this rank)."""

    model: ModelState
    progress: TrainState
    loader: Any  # anything with state_dict()/load_state_dict(): data.BlockLoader
    rng: RNGState
    relora: ReLoRAState
    cfg: Any  # config.Config
    tokenizer_dir: str
    model_config: Any  # transformers LlamaConfig
    precision: str
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0
