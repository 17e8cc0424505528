"""Per-rank scenario bodies for the multi-process tests (run by tests/dist_utils.run_world).

Each returns plain tensors/floats; assertions happen in the test process, against single-process
references computed there or here from gathered full tensors.
"""

from __future__ import annotations

import gc
import weakref

import torch
import torch.distributed as dist

from relora_dist.backends.probe import probe
from relora_dist.trainer import Trainer


def _fixed_loss(t: Trainer, batch: torch.Tensor) -> float:
    with torch.no_grad():
        t.engine.eval()
        loss = t.backend.forward_loss(t.engine, batch).detach().double()
    dist.all_reduce(loss)
    return float(loss) / t.info.world_size


def _frozen_weights(t: Trainer) -> dict[str, torch.Tensor]:
    """Full fp32 merge targets (the fp32 masters when kept, else the module copies)."""
    out = {}
    for name, m in t.modules.items():
        if t.masters is not None and t.masters.kept:
            out[name] = t.backend.shards.gather_owned(m.weight, t.masters.shards[name]).clone()
        else:
            out[name] = t.backend.shards.gather_param(m.weight).reshape(-1)
    return out


def _adapters(t: Trainer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (t.backend.shards.gather_fp32(m.lora_A).clone(), t.backend.shards.gather_fp32(m.lora_B).clone())
            for n, m in t.modules.items()}


def _module_copies(t: Trainer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (t.backend.shards.gather_param(m.lora_A).reshape(m.r, m.in_features),
                t.backend.shards.gather_param(m.lora_B).reshape(m.out_features, m.r)) for n, m in t.modules.items()}


def _optimizer_param_ids(t: Trainer) -> set[int]:
    return {id(p) for p in probe(t.backend).optimizer_params(t.engine)}


def _optimizer_state_numel(t: Trainer) -> int:
    return probe(t.backend).optimizer_state_numel(t.engine)


def full_rank_run(cfg, template, info) -> dict:
    t = Trainer(cfg, template, info)
    st = t.train()
    params = {n: t.backend.shards.gather_param(p) for n, p in t.model.named_parameters()}
    return {"losses": torch.tensor([h["loss"] for h in st.history]), "params": params,
            "evals": torch.tensor([e["eval_loss"] for e in st.evals])}


def _train_and_logits(cfg, template, info, stop_at: int | None):
    """A Trainer run through train() and its logits on the first two validation blocks."""
    t = Trainer(cfg, template, info)
    st = t.train(stop_at=stop_at)
    batch = t.val_blocks.get_batch([0, 1])
    with torch.no_grad():
        t.engine.eval()
        logits = t.engine(input_ids=batch).logits.float()
    return t, st, batch, logits


def relora_run(cfg, template, info, stop_at: int | None = None) -> dict:
    """A (possibly resumed, possibly stopped early) run through train(); returns the logged
    records and the merged fp32 weights at the end."""
    from relora_dist.checkpoint.export import full_state_dict

    t, st, batch, logits = _train_and_logits(cfg, template, info, stop_at)
    return {"logits_batch": batch, "logits": logits, "losses": torch.tensor([h["loss"] for h in st.history], dtype=torch.float64),
            "steps": torch.tensor([h["step"] for h in st.history]),
            "lrs": torch.tensor([h["lr"] for h in st.history]),
            "restart_index": st.restart_index, "phase": st.phase, "state_dict": full_state_dict(t.model_state())}


def relora_checks(cfg, template, info) -> dict:
    """Step through switch and one reset by hand and record everything the tests compare."""
    t = Trainer(cfg, template, info)
    out: dict = {}
    mb = cfg.train.micro_batch_size
    fixed = t.val_blocks.get_batch(list(range(info.rank * mb, (info.rank + 1) * mb)))
    for _ in range(cfg.relora.warm_start_steps):
        t.train_step(t.loader.next_batch())

    # --- switch ---------------------------------------------------------------------------------
    out["loss_before_switch"] = _fixed_loss(t, fixed)
    out["backend"] = t.backend.name  # of the warm start
    w_before = {n: t.backend.shards.gather_fp32(m.weight).reshape(-1).clone() for n, m in t.modules.items()}
    engine_ref, optimizer_ref = weakref.ref(t.engine), weakref.ref(t.engine.optimizer)
    t.backend.optimizer_state.link_fragments(t.engine)
    extras = {n: p for n, p in t.model.named_parameters() if "embed_tokens" in n or n.endswith("norm.weight")}
    out["extra_moments_pre"] = {n: {k: t.backend.optimizer_state.gather_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")}
                                for n, p in extras.items()}
    out["adam_step_pre"] = t.backend.optimizer_state.adam_step(t.engine)
    offload = getattr(t.engine.optimizer, "parameter_offload", None)  # ZeRO-3's hook owner
    offload_ref = weakref.ref(offload) if offload is not None else (lambda: None)
    del offload
    # The warm-start engine's fp32 masters and optimizer state, by tensor (not views): each must be
    # freed by the switch, also when something still refers to it from outside Python (an autograd
    # node of a copy taken with grad enabled).
    state_refs = [weakref.ref(x) for _, x, cat in probe(t.backend).held_tensors(t.engine, t.model)
                  if cat in ("fp32_master", "optimizer_state") and x._base is None]
    t.switch_to_relora()
    gc.collect()
    out["engine1_collected"] = engine_ref() is None and optimizer_ref() is None and offload_ref() is None
    out["engine1_state_tensors"] = len(state_refs)
    out["engine1_state_alive"] = sum(ref() is not None for ref in state_refs)
    out["masters_with_history"] = sum(v.requires_grad or v.grad_fn is not None for v in t.masters.shards.values())
    out["loss_after_switch"] = _fixed_loss(t, fixed)
    t.backend.optimizer_state.link_fragments(t.engine)
    out["extra_moments_post"] = {n: {k: t.backend.optimizer_state.gather_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")}
                                 for n, p in extras.items()}
    out["adam_step_post"] = t.backend.optimizer_state.adam_step(t.engine)
    w_switch = _frozen_weights(t)
    out["rank"], out["relora_backend"], out["phase_stage"] = info.rank, t.backend.name, cfg.relora.phase_stage
    # bf16 compute: a rounded module copy beside the fp32 master (ZeRO), or only fp32 shards that
    # each forward's all-gather rounds (FSDP2)
    out["bf16_module_copy"] = t.precision == "bf16" and not t.backend.shards.fp32_params
    out["master_numel"] = sum(v.numel() for v in t.masters.shards.values()) if t.masters.kept else 0
    out["wrapped_numels"] = [m.out_features * m.in_features for m in t.modules.values()]
    out["switch_weight_maxdiff"] = max(float((w_switch[n] - w_before[n]).abs().max()) for n in w_before)
    names = {id(p): n for n, p in t.model.named_parameters()}
    held = _optimizer_param_ids(t)
    out["optimizer_params"] = sorted(names[i] for i in held)
    out["trainable_params"] = sorted(n for n, p in t.model.named_parameters() if p.requires_grad)
    out["trainable_numel"] = sum(t.backend.shards.numel(p) for p in t.model.parameters() if p.requires_grad)
    out["optimizer_state_numel"] = _optimizer_state_numel(t)

    # --- first ReLoRA steps: gradients of A and B -----------------------------------------------
    grads: list[dict] = []

    def read_grads():
        grads.append({n: (float(probe(t.backend).gather_grad(m.lora_A).abs().sum()),
                          float(probe(t.backend).gather_grad(m.lora_B).abs().sum())) for n, m in t.modules.items()})

    t.train_step(t.loader.next_batch(), before_update=read_grads)
    t.train_step(t.loader.next_batch(), before_update=read_grads)
    out["grad_abs_first"] = {n: torch.tensor(v) for n, v in grads[0].items()}
    out["grad_abs_second"] = {n: torch.tensor(v) for n, v in grads[1].items()}

    # --- run to the LR-0 step, then reset -------------------------------------------------------
    lr0 = None
    while not t.reset_due():
        lr0 = t.train_step(t.loader.next_batch())["lr"]
    out["lr_of_step_before_reset"] = lr0
    out["base_maxdiff_within_cycle"] = max(
        float((w - w_switch[n]).abs().max()) for n, w in _frozen_weights(t).items())
    w_pre = _frozen_weights(t)
    ab = _adapters(t)
    embed = next(p for n, p in t.model.named_parameters() if "embed_tokens" in n)
    moments_pre = {n: {k: t.backend.optimizer_state.gather_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")}
                   for n, m in t.modules.items() for p in (m.lora_A,)}
    embed_moment_pre = t.backend.optimizer_state.gather_state(embed, "exp_avg").clone()
    out["loss_before_reset"] = _fixed_loss(t, fixed)
    t.reset()
    out["loss_after_reset"] = _fixed_loss(t, fixed)
    out["w_pre"], out["ab_pre"], out["w_post"] = w_pre, ab, _frozen_weights(t)
    out["module_w_post"] = {n: t.backend.shards.gather_param(m.weight).reshape(-1) for n, m in t.modules.items()}
    out["scale"] = {n: m.scale for n, m in t.modules.items()}
    out["relora_name"] = {n: m.relora_name for n, m in t.modules.items()}
    out["ab_post"], out["ab_module_post"] = _adapters(t), _module_copies(t)
    out["moments_pre"] = moments_pre
    out["moments_post"] = {n: {k: t.backend.optimizer_state.gather_state(m.lora_A, k).clone()
                               for k in ("exp_avg", "exp_avg_sq")} for n, m in t.modules.items()}
    out["embed_moment_unchanged"] = bool(torch.equal(embed_moment_pre,
                                                     t.backend.optimizer_state.gather_state(embed, "exp_avg")))
    out["restart_index"] = t.state.restart_index

    # --- a step at LR 0 keeps the fresh adapters; the base stays frozen --------------------------
    t.train_step(t.loader.next_batch(), lr=0.0)
    out["ab_after_lr0"], out["ab_module_after_lr0"] = _adapters(t), _module_copies(t)
    t.train_step(t.loader.next_batch())
    out["w_after_more_steps"] = _frozen_weights(t)
    return out


def loaded_masters(cfg, template, info) -> dict:
    """Build a Trainer that resumes a checkpoint; return its full merge masters and compute weights."""
    t = Trainer(cfg, template, info)
    return {"masters": _frozen_weights(t),
            "weights": {n: t.backend.shards.gather_param(m.weight).reshape(-1) for n, m in t.modules.items()},
            "master_numel": sum(v.numel() for v in t.masters.shards.values()),
            "wrapped_numels": [m.out_features * m.in_features for m in t.modules.values()]}


def _poisoned_trainer(cfg, template, info, poison_steps: set, poison_rank: int) -> tuple[Trainer, list]:
    """A Trainer whose loss is NaN on `poison_rank` during the given (1-based) steps, and the
    first trainable weight's fp32 master after every step."""
    t = Trainer(cfg, template, info)
    t.model.lm_head.register_forward_hook(
        lambda mod, inp, out: out * float("nan") if info.rank == poison_rank and t.state.step + 1 in poison_steps
        else None)
    masters: list = []
    step = t.train_step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        p = next(p for p in t.model.parameters() if p.requires_grad)
        masters.append(t.backend.shards.gather_fp32(p).clone())
        return out

    t.train_step = recording_step
    return t, masters


def nonfinite_runs(cfg, template, info, base: str) -> dict:
    """Three runs with injected NaN losses on rank 1 (skip and recover, stop, too many skips) and
    a save of a model holding a NaN."""
    from relora_dist.config import load_config
    from relora_dist.runtime.faults import RunAborted

    def run(name, steps, **extra):
        c = load_config(None, [f"--{k}={v}" for k, v in {**extra, "run.output_dir": f"{base}/{name}"}.items()])
        for section in ("model", "data", "train", "optimizer", "schedule", "relora", "logging", "run"):
            for key, value in vars(getattr(c, section)).items():
                if key not in {k.split(".")[1] for k in extra if k.startswith(section + ".")} | {"output_dir"}:
                    setattr(getattr(c, section), key, getattr(getattr(cfg, section), key))
        t, masters = _poisoned_trainer(c, template, info, steps, 1)
        try:
            t.train()
            error = ""
        except RunAborted as e:
            error = str(e)
        return t, masters, error

    out = {}
    t, masters, out["skip_error"] = run("skip", {3, 4}, **{"train.on_nonfinite": "skip", "train.max_skipped_steps": 2})
    out["skip_losses"] = torch.tensor([h["loss"] for h in t.state.history], dtype=torch.float64)
    out["skip_masters"] = torch.stack(masters)
    out["skipped_steps"], out["skip_final_step"] = t.state.skipped_steps, t.state.step
    with torch.no_grad():  # a NaN in a frozen weight on rank 1 only: the save is refused on every rank
        frozen = next(p for p in t.model.parameters() if not p.requires_grad)
        if info.rank == 1:
            frozen.data.fill_(float("nan"))
    try:
        t.save_checkpoint()
        out["nan_save_error"] = ""
    except RunAborted as e:
        out["nan_save_error"] = str(e)
    _, _, out["stop_error"] = run("stop", {5}, **{"checkpoint.save_every": 2})
    _, _, out["limit_error"] = run("limit", {5, 6, 7}, **{"train.on_nonfinite": "skip", "train.max_skipped_steps": 2,
                                                          "checkpoint.save_every": 2})
    # every ReLoRA step skipped up to the first reset (after step 9): no Adam state to prune yet
    t, _, out["noopt_error"] = run("noopt", set(range(5, 11)), **{
        "train.on_nonfinite": "skip", "train.max_skipped_steps": 10, "train.max_steps": 12})
    out["noopt_restart_index"], out["noopt_skipped"] = t.state.restart_index, t.state.skipped_steps
    return out


def killed_run(cfg, template, info, where: str, at_step: int, victim: int) -> dict:
    """A run whose rank `victim` kills itself with SIGKILL at (1-based) step `at_step`: mid-step
    (after the backward, before the update), mid-reset (after the merge and re-draw, before the
    prune) or mid-save (its shard written, nothing published yet)."""
    import os
    import signal

    from relora_dist.checkpoint import format as checkpoint

    from relora_dist.relora import steps as relora_steps

    t = Trainer(cfg, template, info)

    def die():
        if info.rank == victim and t.state.step + (1 if where == "step" else 0) == at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    if where == "step":
        step = t.train_step
        t.train_step = lambda batch, **kw: step(batch, before_update=die)
    elif where == "reset":
        prune = relora_steps.prune_adapter_moments
        relora_steps.prune_adapter_moments = lambda *a, **kw: (die(), prune(*a, **kw))[1]
    else:
        write = checkpoint.save_file
        checkpoint.save_file = lambda *a, **kw: (write(*a, **kw), die())[0]
    t.train()
    return {}


from tests.scenarios_quant import adam8_checks, quant_checks  # noqa: E402,F401  (run_world looks scenarios up here)
from tests.scenarios_overflow import fused_vs_deepspeed  # noqa: E402,F401


def relora_runs(cfg, template, info, runs: list[list[str]], stop_at: int | None = None) -> dict:
    """relora_run once per override list (several models in one process group); `cfg` is unused.
    Adds whether the tied lm_head is the embedding Parameter itself and what was wrapped."""
    from relora_dist.config import load_config

    out = {}
    for i, overrides in enumerate(runs):
        t, st, batch, logits = _train_and_logits(load_config(None, overrides), template, info, stop_at)
        inner = t.model
        out[i] = {"logits_batch": batch, "logits": logits, "phase": st.phase, "restart_index": st.restart_index,
                  "losses": torch.tensor([h["loss"] for h in st.history], dtype=torch.float64),
                  "tied_one_param": inner.lm_head.weight is inner.model.embed_tokens.weight,
                  "wrapped": sorted(t.modules),
                  "trainable": sorted(n for n, p in inner.named_parameters() if p.requires_grad)}
        t.backend.teardown_engine(t.engine)
        t.engine = None
        del t
        gc.collect()
    return out


def first_use_without_collective(cfg, template, info, bad_source: str, delay_s: float) -> dict:
    """Data prepared on first use under a process-group timeout shorter than the preparation:
    first a source that does not decode (every rank must fail at once), then the bundled corpus
    with `delay_s` of sleep injected into rank 0's prepare_dataset, followed by two training steps."""
    import contextlib
    import io
    import time

    from relora_dist.data import DataError, ensure_prepared, first_use, prepare, tokenizer_dir_of

    d = cfg.data
    t0 = time.monotonic()
    try:
        ensure_prepared([bad_source], tokenizer_dir_of(cfg), d.cache_dir, d.seq_len, d.val_fraction,
                        timeout_s=d.prepare_timeout_s, local_rank=info.local_rank)
        failure = ""
    except DataError as e:
        failure = str(e)
    fail_s = time.monotonic() - t0

    if info.rank == 0:
        real = prepare.prepare_dataset

        def slow(**kwargs):
            time.sleep(delay_s)
            return real(**kwargs)

        prepare.prepare_dataset = slow
    first_use.PROGRESS_EVERY_S = 2.0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        t = Trainer(cfg, template, info)
    st = t.train()
    return {"failure": failure, "fail_s": fail_s, "output": out.getvalue(), "steps": st.step,
            "data_dir": t.train_blocks.data_dir, "data_sha256": t.train_blocks.meta["data_sha256"]}


def compile_run(cfg, template, info) -> dict:
    """A run through train() that records dynamo's graph count when each phase begins and at each
    reset (train.compile: one recompile at the switch, none at a reset)."""
    from torch._dynamo.utils import counters

    graphs = lambda: int(counters["stats"]["unique_graphs"])  # noqa: E731
    marks: dict = {}
    t = Trainer(cfg, template, info)
    switch, reset = t.switch_to_relora, t.reset

    def on_switch():
        marks["before_switch"] = graphs()
        switch()

    def on_reset():
        marks.setdefault("resets", []).append(graphs())
        return reset()

    t.switch_to_relora, t.reset = on_switch, on_reset
    st = t.train()
    marks["end"] = graphs()
    return {"losses": torch.tensor([h["loss"] for h in st.history], dtype=torch.float64),
            "evals": torch.tensor([e["eval_loss"] for e in st.evals], dtype=torch.float64),
            "graphs": marks, "restart_index": st.restart_index, "names": list(t.model.state_dict()),
            "compiled_layers": sum(getattr(m, "_compiled_call_impl", None) is not None for m in t.model.modules())}


def reinit_runs(cfg, template, info, runs: list[list[str]]) -> dict:
    """One run through train() per override list; records each adapter's A and its B's and A's Adam
    moments right after the first reset, and every step's loss."""
    from relora_dist.config import load_config

    out = {}
    for i, overrides in enumerate(runs):
        t = Trainer(load_config(None, overrides), template, info)
        after: dict = {}
        reset = t.reset

        def recording(t=t, after=after, reset=reset):
            timings = reset()
            if not after:
                t.backend.optimizer_state.link_fragments(t.engine)
                after["A"] = {n: a.view(m.r, m.in_features) for (n, m), (a, _) in zip(t.modules.items(), _adapters(t).values())}
                after["moments"] = {f"{n}.{which}": {k: t.backend.optimizer_state.gather_state(p, k).clone()
                                                     for k in ("exp_avg", "exp_avg_sq")}
                                    for n, m in t.modules.items() for which, p in (("A", m.lora_A), ("B", m.lora_B))}
                after["sketches_left"] = sum(m.grad_sketch is not None for m in t.modules.values())
            return timings

        t.reset = recording
        st = t.train()
        out[i] = {"losses": torch.tensor([h["loss"] for h in st.history], dtype=torch.float64),
                  "names": {n: m.relora_name for n, m in t.modules.items()}, **after}
        t.backend.teardown_engine(t.engine)
        t.engine = None
        del t
        gc.collect()
    return out
