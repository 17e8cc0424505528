"""One Trainer for both phases: full-rank warm start, then ReLoRA cycles with collective resets.

Model code (model.py, relora/layer.py) knows nothing about sharding; the Trainer talks to DeepSpeed only
through the backend contract (backends/), and the ReLoRA steps live in relora/steps.py. Checkpoints
and exports never see the Trainer: it hands them its components (checkpoint/state.py, Trainer.checkpoint_state).
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from relora_dist.checkpoint import format as ckpt
from relora_dist.runtime import faults
from relora_dist.runtime import run_guard
from relora_dist.relora import steps
from relora_dist.checkpoint import resume
from relora_dist.relora import schedule
from relora_dist.backends.factory import make_backend
from relora_dist.runtime.compile import compile_blocks
from relora_dist.config import Config, dump_config
from relora_dist.data import (
    DEFAULT_CORPUS,
    BlockLoader,
    PackedBlocks,
    check_tokenizer_matches,
    ensure_prepared,
    eval_batches,
    tokenizer_dir_of,
)
from relora_dist.runtime.dist import DistInfo
from relora_dist.backends.ds_config import build_ds_config, resolve_backend, resolve_precision
from relora_dist.runtime.faults import is_finite
from relora_dist.runtime.metrics import MetricsLogger, default_peak_flops, peak_memory_mb
from relora_dist.model import build_model, flops_per_token, llama_config
from relora_dist.relora.reinit_steps import start_gradient_sketch
from relora_dist.relora.layer import freeze_for_full_rank, relora_modules, wrap_model
from relora_dist.checkpoint.state import CheckpointState, ModelState, ReLoRAState, RNGState, TrainState
from relora_dist.data.tokenizer import load_tokenizer
from relora_dist.validation import validate


def param_groups(model: torch.nn.Module, cfg: Config, lr: float, shape=lambda p: p.shape) -> list[dict]:
    """Trainable params in two AdamW groups: decoupled decay on matrices, none on norms/biases
    (optimizer.decay_1d=true: decay on every trainable param, as the reference). `shape` gives a
    param's whole shape (Shards.shape: a sharded param's own shape is its shard's)."""
    o = cfg.optimizer
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if o.decay_1d or len(shape(p)) >= 2 else no_decay).append(p)
    common = dict(lr=lr) if o.name == "sgd" else dict(lr=lr, betas=(o.beta1, o.beta2), eps=o.eps)
    groups = [dict(params=decay, weight_decay=o.weight_decay, **common),
              dict(params=no_decay, weight_decay=0.0, **common)]
    return [g for g in groups if g["params"]]


class Trainer:
    def __init__(self, cfg: Config, ds_template: dict, info: DistInfo):
        validate(cfg)
        self.cfg, self.info = cfg, info
        run_guard.lock_output(cfg, info)
        self.device = info.device
        self.precision = resolve_precision(cfg.train.precision)
        self._build_data(ds_template)
        self._build_model()
        # The global RNGs (adapter dropout; anything DeepSpeed draws) start from train.seed and the
        # rank, so the same command gives the same run: torch's own initial seed differs per process.
        torch.manual_seed(cfg.train.seed + 1_000_003 * info.rank)
        self.backend = make_backend(resolve_backend(ds_template, cfg), self.ds_config, info.rank, info.world_size,
                                    cfg.optimizer.name, cfg.optimizer.implementation)
        self.state = TrainState()
        self.masters = None
        self.engine = None
        manifest = self._start_or_resume()
        self._build_logging(manifest)
        self._stop_requested = False

    # --- builders (in __init__'s order) -------------------------------------------------------------
    def _build_data(self, ds_template: dict) -> None:
        """Tokenizer, the resolved engine settings (batch arithmetic), the packed blocks and the loader."""
        c, info = self.cfg, self.info
        self.tokenizer_dir = tokenizer_dir_of(c)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.ds_config = build_ds_config(ds_template, c, info.world_size)
        self.grad_accum = int(self.ds_config["gradient_accumulation_steps"])
        data_dir = c.data.prepared_dir or ensure_prepared(
            c.data.sources or [str(DEFAULT_CORPUS)], self.tokenizer_dir, c.data.cache_dir,
            c.data.seq_len, c.data.val_fraction, c.train.seed, timeout_s=c.data.prepare_timeout_s,
            local_rank=info.local_rank)  # no collective: first_use.py
        check_tokenizer_matches(data_dir, self.tokenizer.vocab_size)
        self.train_blocks = PackedBlocks(data_dir, "train", c.data.seq_len)
        self.val_blocks = PackedBlocks(data_dir, "val", c.data.seq_len)
        # Evaluation's block rule, now rather than at the first evaluation after training steps.
        eval_batches(self.val_blocks, c.train.micro_batch_size, info.rank, info.world_size,
                     max(1, c.train.eval_tokens // c.data.seq_len))
        self.loader = BlockLoader(self.train_blocks, c.train.micro_batch_size, self.grad_accum,
                                  info.rank, info.world_size, c.train.seed)
        self.tokens_per_step = c.train.global_batch_size * c.data.seq_len

    def _build_model(self) -> None:
        """The LLaMA model, with ReLoRA's adapters when relora.enabled, and its FLOP figures."""
        c, m = self.cfg, self.cfg.model
        self.model_config = llama_config(m.preset, self.tokenizer.vocab_size, c.data.seq_len, m.hidden_size,
                                         m.intermediate_size, m.num_layers, m.num_heads)
        self.model = build_model(self.model_config, c.train.seed, m.init_from)  # vocab checked by validate
        self.model_config = self.model.config
        self.modules = {}
        if c.relora.enabled:
            wrap_model(self.model, c.relora.targets, c.relora.r, c.relora.alpha, c.relora.dropout,
                       seed=c.train.seed)
            self.modules = relora_modules(self.model)
        if c.train.compile:  # before the engines shard and hook the layers, as torchtitan orders it
            layers = compile_blocks(self.model)
            if self.info.is_main:
                print(f"note: train.compile: {layers} decoder layers compile at their first step and again at the "
                      f"switch to ReLoRA (torch.compile)", flush=True)
        self.flops_per_token = flops_per_token(self.model_config, c.data.seq_len)
        self.peak_flops = c.logging.peak_flops or default_peak_flops(self.device, self.precision)

    def _start_or_resume(self) -> dict | None:
        """The checkpoint folder's rules (overwrite, abandon, stale temporaries), then the first
        engine of the phase the run is in, loaded from the checkpoint to resume. Its manifest."""
        c, info = self.cfg, self.info
        self.output_dir = Path(c.run.output_dir)
        self.checkpoint_root = resume.checkpoint_root(c)
        resume.check_output_dir(c, self.checkpoint_root)
        stale = ckpt.remove_stale_temporaries(self.checkpoint_root) if info.is_main else []
        if stale:
            print(f"note: removed {', '.join(stale)} from {self.checkpoint_root} (left by a save that was killed "
                  f"midway; the published checkpoints are complete)", flush=True)
        if c.checkpoint.overwrite and info.is_main:
            resume.remove_checkpoints(self.checkpoint_root)
        if info.is_main:
            resume.abandon_on_resume(c, self.checkpoint_root)
        dist.barrier()
        self.resumed_from = resume.resume_target(c, self.checkpoint_root)
        manifest = ckpt.read_manifest(self.resumed_from) if self.resumed_from else None
        if c.relora.enabled and (c.relora.warm_start_steps == 0 or (manifest and manifest["phase"] == "relora")):
            self.switch_to_relora()
        else:
            self.start_full_rank()
        if manifest is not None:
            resume.load_checkpoint(self.checkpoint_state(), self.resumed_from)
        return manifest

    def _build_logging(self, manifest: dict | None) -> None:
        """The run's config beside its output, the metrics logger and the resume line."""
        c, info = self.cfg, self.info
        if info.is_main:  # each resumed segment's config is kept beside the first one's
            dump_config(c, self.output_dir / (f"config.{self.resumed_from.name}.yaml" if self.resumed_from
                                              else "config.yaml"))
        self.log = MetricsLogger(info.is_main, self.output_dir / "tb", c.logging.tensorboard,
                                 c.logging.progress_bar, c.train.max_steps, initial_step=self.state.step)
        if self.resumed_from:
            self.log.print(f"resumed from {self.resumed_from} at step {self.state.step} ({self.state.phase}, "
                           f"restart index {self.state.restart_index}, world size {manifest['world_size']} -> "
                           f"{info.world_size}, {manifest.get('backend', 'zero%d' % manifest['zero_stage'])} -> {self.backend.name})")

    # --- phases -----------------------------------------------------------------------------------
    @property
    def peak_lr(self) -> float:
        return self.cfg.relora_lr if self.state.phase == "relora" else self.cfg.optimizer.lr

    def start_full_rank(self) -> None:
        """The warm start's engine over every parameter (the wrapped weights train, adapters off)."""
        if self.cfg.relora.enabled:
            freeze_for_full_rank(self.model)
        self.engine = self.backend.build_engine(
            self.model, param_groups(self.model, self.cfg, self.cfg.optimizer.lr, self.backend.shards.shape))

    def switch_due(self) -> bool:
        """Whether the warm start ends before the next step: relora.warm_start_steps are done."""
        r = self.cfg.relora
        return r.enabled and self.state.phase == "full_rank" and self.state.step == r.warm_start_steps

    def reset_due(self) -> bool:
        """Whether a reset follows the step just taken. `state.step` counts steps taken, so that
        step's 0-based index, the one its learning rate was scheduled by (schedule.lr_multiplier),
        is state.step - 1: the step at LR 0 that a reset follows."""
        return schedule.reset_due(self.cfg, self.state.step - 1)

    def switch_to_relora(self) -> None:
        """Tear down the full-rank engine and continue with adapters only (relora/steps.py)."""
        self.state.phase = "relora"
        engine, self.engine = self.engine, None
        phase_backend = self.backend.relora_phase_backend(self.cfg)
        self.engine, self.masters = steps.switch_to_relora(
            self.backend, engine, self.model, self.cfg, self.modules,
            lambda model: param_groups(model, self.cfg, self.cfg.relora_lr, self.backend.shards.shape),
            compute_fp32=self.precision == "fp32" or self.backend.shards.fp32_params, phase_backend=phase_backend)
        self.backend = phase_backend
        del engine
        self.state.restart_index = 0

    def sketch_next_step(self) -> None:
        """relora.reinit=gradient/project: the next step sketches the frozen weights' gradient, from
        which the reset after it re-initialises A (relora_dist/relora/reinit.py). No-op for random."""
        r = self.cfg.relora
        if r.reinit != "random" and self.state.phase == "relora":
            start_gradient_sketch(self.modules, self.cfg.train.seed, self.state.restart_index + 1, self.device,
                                  r.reinit_micro_batches)

    def reset(self) -> dict[str, float]:
        """Merge, re-init and prune after the step taken at LR 0."""
        self.state.restart_index += 1
        return steps.relora_reset(self.backend, self.modules, self.masters, self.cfg, self.state.restart_index)

    def rank_stats(self, *, measure: bool) -> dict[str, float]:
        if not self.modules or self.state.phase != "relora":
            return {}
        return steps.rank_stats(self.backend, self.modules, self.masters, self.state.restart_index, measure=measure)

    # --- steps ------------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        self.backend.set_lr(self.engine, lr)

    def train_step(self, micro_batches: list[torch.Tensor], lr: float | None = None,
                   before_update=None) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns rank-averaged metrics.
        `lr` overrides the schedule; `before_update()` runs after the last backward, before the
        update (tests read gradients there)."""
        if lr is None:
            lr = self.peak_lr * schedule.lr_multiplier(self.cfg, self.state.step)
        if schedule.reset_due(self.cfg, self.state.step):
            self.sketch_next_step()
        self.set_lr(lr)
        losses, grad_norm = self.backend.train_step(self.engine, [b.to(self.device) for b in micro_batches],
                                                    before_update)
        values = torch.stack([v.double().cpu() for v in losses])
        # The non-finite count rides on the loss all-reduce: every rank agrees, no extra collective.
        total = self._all_reduce(torch.stack([values.mean(), (~torch.isfinite(values)).double().sum()]))
        loss = float(total[0]) / self.info.world_size
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm if grad_norm is not None else float("nan"),
                "nonfinite": bool(total[1] > 0) or not is_finite(loss, grad_norm)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        c = self.cfg
        self.backend.set_train(self.engine, False)
        max_blocks = max(1, c.train.eval_tokens // c.data.seq_len)
        sums = torch.zeros(2, dtype=torch.float64)
        for batch in eval_batches(self.val_blocks, c.train.micro_batch_size, self.info.rank,
                                  self.info.world_size, max_blocks):
            batch = batch.to(self.device)
            loss = self.backend.forward_loss(self.engine, batch)
            sums += torch.tensor([float(loss) * batch.shape[0], batch.shape[0]], dtype=torch.float64)
        sums = self._all_reduce(sums)
        loss = float(sums[0] / sums[1])
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def trainable_params(self) -> int:
        return sum(self.backend.shards.numel(p) for p in self.model.parameters() if p.requires_grad)

    # --- the loop ---------------------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> TrainState:
        """Train to train.max_steps; `stop_at` stops early after that step exactly like a SIGTERM
        (checkpoint, then return), which the resume tests use."""
        c, st = self.cfg, self.state
        r = c.relora
        evals = st.evals
        if self.resumed_from is None:
            first_eval = self.evaluate()
            evals.append({"step": 0, **first_eval})
            self.log.scalars(0, {"eval/loss": first_eval["eval_loss"], "eval/ppl": first_eval["eval_ppl"]})
            self.log.print(f"step 0 | eval loss {first_eval['eval_loss']:.4f} ppl {first_eval['eval_ppl']:.2f}")
        if st.step >= c.train.max_steps:
            self.log.print(f"nothing to do: the run is already at step {st.step} = train.max_steps "
                           f"({self.resumed_from}); raise train.max_steps to continue it")
        previous = {sig: signal.signal(sig, self._on_sigterm) for sig in faults.STOP_SIGNALS}
        t_last = time.perf_counter()
        while st.step < c.train.max_steps:
            if self.switch_due():
                self.log_phase_summary(evals[-1] if evals else {})
                self.export_warm_start()
                self.switch_to_relora()
                master_mb = self.masters.nbytes() / 2**20
                self.log.print(f"step {st.step} | switched to ReLoRA: trainable params "
                               f"{self.trainable_params():,} of {self.total_params():,} | fp32 merge "
                               f"masters {master_mb:.1f} MB on rank {self.info.rank}"
                               f"{' in host memory' if self.cfg.relora.merge_master_device == 'cpu' else ''} (+"
                               f"{self.masters.snapshot_nbytes() / 2**20:.1f} MB W_switch snapshot for the "
                               f"effective rank)" + self._quant_note())
                self.log.scalars(st.step, {"mem/frozen_master_mb": master_mb})
            metrics = self.train_step(self.loader.next_batch())
            faults.progress()
            self._check_finite(metrics)
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            tok_s = self.tokens_per_step / dt
            record = {"step": st.step, **metrics, "tokens_seen": st.tokens_seen, "tokens_per_s": tok_s,
                      "mfu": tok_s * self.flops_per_token / (self.peak_flops * self.info.world_size),
                      "phase": st.phase, "restart_index": st.restart_index}
            if self.reset_due():
                timings = self.reset()
                record.update({f"reset_{k}_s": v for k, v in timings.items()}, restart_index=st.restart_index)
                record.update(self.rank_stats(measure=r.effective_rank_every >= 0))
                self.log.print(f"step {st.step} | reset {st.restart_index}: merge {timings['merge']:.3f}s "
                               f"re-init {timings['reinit']:.3f}s prune {timings['prune']:.3f}s | "
                               f"cumulative rank {record['cumulative_rank_mean']:.0f}"
                               + (f" effective {record['effective_rank_mean']:.1f}" if "effective_rank_mean" in record else ""))
            elif r.effective_rank_every > 0 and st.phase == "relora" and st.step % r.effective_rank_every == 0:
                record.update(self.rank_stats(measure=True))
            if c.train.eval_every and st.step % c.train.eval_every == 0 or st.step == c.train.max_steps:
                record.update(self.evaluate())
                evals.append({"step": st.step, "eval_loss": record["eval_loss"], "eval_ppl": record["eval_ppl"]})
            self._log_record(record)
            stop = self._stop_agreed() or st.step == stop_at
            every = c.checkpoint.save_every
            if stop or st.step == c.train.max_steps or (every and st.step % every == 0):
                path = self.save_checkpoint()
                self.log.print(f"step {st.step} | saved checkpoint {path}")
            if stop:
                self.log.print(f"step {st.step} | {faults.stop_signal() or 'SIGTERM'}: checkpoint saved, exiting cleanly")
                st.stopped = True
                break
            t_last = time.perf_counter()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if evals and not st.stopped:
            self.log_phase_summary(evals[-1])
            self.log.print(f"done | first eval ppl {evals[0]['eval_ppl']:.2f} -> final eval ppl {evals[-1]['eval_ppl']:.2f}")
        self.log.close()
        return st

    def _check_finite(self, metrics: dict) -> None:
        """train.on_nonfinite (faults.on_nonfinite): raises RunAborted, or logs a skipped step."""
        line = faults.on_nonfinite(self.state, self.cfg.train, metrics, lambda: ckpt.find_latest(self.checkpoint_root))
        if line:
            self.log.print(line)

    def _all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """All-reduce a small CPU tensor through the accelerator (NCCL takes only device tensors);
        none at world size 1 (see Shards.gather_slices for why collectives cost more there)."""
        if self.info.world_size == 1:
            return t.clone()
        on_device = t.to(self.device)
        dist.all_reduce(on_device, op=op)
        return on_device.cpu()

    # --- checkpoints and preemption -------------------------------------------------------------
    def model_state(self) -> ModelState:
        """The sharded state as it is now (the switch to ReLoRA replaces engine, backend and masters)."""
        return ModelState(self.backend, self.engine, self.model, self.modules, self.masters)

    def checkpoint_state(self) -> CheckpointState:
        """The components a checkpoint saves and a resume restores (checkpoint/state.py)."""
        r = self.cfg.relora
        return CheckpointState(
            model=self.model_state(), progress=self.state, loader=self.loader, rng=RNGState(),
            relora=ReLoRAState(r.r, r.alpha, r.targets, self.modules, self.state,
                               stats=lambda: self.rank_stats(measure=False)),
            cfg=self.cfg, tokenizer_dir=self.tokenizer_dir, model_config=self.model_config,
            precision=self.precision, rank=self.info.rank, world_size=self.info.world_size)

    def save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(self.checkpoint_state(), self.checkpoint_root, self.cfg.checkpoint.keep_last)

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_requested = True  # acted on at the next step boundary, on every rank at once

    def _stop_agreed(self) -> bool:
        """Cluster preemption sends SIGTERM; ranks agree (MAX all-reduce) so all save together."""
        flag = torch.tensor([1.0 if self._stop_requested or faults.stop_requested() else 0.0])
        flag = self._all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def total_params(self) -> int:
        quantized = sum(m.weight.numel() for m in self.modules.values() if m.qweight is not None)
        return quantized + sum(self.backend.shards.numel(p) for p in self.model.parameters())

    def _quant_note(self) -> str:
        from relora_dist.relora.quant_steps import held_quantized_nbytes

        held = held_quantized_nbytes(self.modules)
        if not held:
            return ""
        return (f" | frozen base {self.cfg.relora.base_quant}: {held / 2**20:.1f} MB per rank, requantized from the "
                f"fp32 masters ({self.cfg.relora.quant_merge}) at each reset")

    def _log_record(self, record: dict) -> None:
        c, st = self.cfg, self.state
        # every rank's peak (collective: all ranks log every step), so rank 0 can log them all
        peaks = torch.zeros(self.info.world_size, dtype=torch.float64)
        peaks[self.info.rank] = peak_memory_mb(self.device)
        peaks = self._all_reduce(peaks)
        record["peak_mem_mb"] = float(peaks[self.info.rank])
        st.history.append(record)
        self.log.step(st.step, record, phase=st.phase, restart_index=st.restart_index,
                      skipped_steps=st.skipped_steps, peaks=peaks.tolist(), log_every=c.logging.log_every)

    def log_phase_summary(self, last_eval: dict) -> None:
        st = self.state
        losses = [h["loss"] for h in st.history if h["phase"] == st.phase][-10:]
        if not losses:
            return
        summary = (f"== phase {st.phase} ends at step {st.step}: loss {sum(losses) / len(losses):.4f} "
                   f"(last {len(losses)} steps)")
        if last_eval:
            summary += f", eval ppl {last_eval.get('eval_ppl', float('nan')):.2f}"
        summary += f", trainable params {self.trainable_params():,}"
        if st.phase == "relora":
            cum = steps.rank_stats(self.backend, self.modules, self.masters, st.restart_index, measure=False)
            summary += f", restart index {st.restart_index}, cumulative rank {cum['cumulative_rank_mean']:.0f}/module"
        self.log.print(summary)

    # --- export -----------------------------------------------------------------------------------
    def export_warm_start(self) -> None:
        if self.cfg.run.export_warm_start:
            from relora_dist.checkpoint.export import export_hf

            export_hf(self.checkpoint_state(), self.output_dir / "warm_start")
