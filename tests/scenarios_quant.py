"""Multi-rank scenarios for the quantized frozen base (tests/test_quant.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from relora_dist.relora import steps
from relora_dist.backends.probe import probe
from relora_dist.relora.quant import QuantizedWeight
from relora_dist.relora.quant_steps import full_master
from relora_dist.trainer import Trainer


def _codes(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    scales = qw.state.absmax if qw.kind == "nf4" else qw.state
    return qw.data.clone(), scales.clone()


def _set_adapters(t: Trainer, k: int, magnitude: float) -> dict:
    """Random non-zero A, B (the same on every rank: seeded by k), written like a trained adapter."""
    out = {}
    for i, (name, m) in enumerate(t.modules.items()):
        g = torch.Generator().manual_seed(1000 * k + i)
        A = torch.randn(m.r, m.in_features, generator=g) * magnitude
        B = torch.randn(m.out_features, m.r, generator=g) * magnitude
        t.backend.shards.write_trainable(m.lora_A, A)
        t.backend.shards.write_trainable(m.lora_B, B)
        out[name] = (A, B)
    return out


def _drift(t: Trainer) -> dict[str, list[float]]:
    """Per module: [fraction of codes != quantize(master) codes, max |dequant(Wq) - master| /
    max |master|]."""
    out = {}
    for name, m in t.modules.items():
        master = full_master(t.backend, m, t.masters.shards[name])
        exact = QuantizedWeight.quantize(master, m.qweight.kind)
        mismatch = float((m.qweight.data != exact.data).float().mean())
        err = float((m.qweight.dequantize() - master).abs().max() / master.abs().max())
        out[name] = [mismatch, err]
    return out


def quant_checks(cfg, template, info, resets: int = 10, magnitude: float = 0.05) -> dict:
    """Warm start, switch to a quantized base, two ReLoRA steps, then `resets` merges of seeded
    random adapters on the master path and, from the same start, on the reference path."""
    t = Trainer(cfg, template, info)
    for _ in range(cfg.relora.warm_start_steps):
        t.train_step(t.loader.next_batch())
    t.switch_to_relora()
    out: dict = {"rank": info.rank, "kind": cfg.relora.base_quant}
    out["param_names"] = sorted(n for n, _ in t.model.named_parameters())
    out["state_dict_keys"] = sorted(t.model.state_dict().keys())
    out["optimizer_numel"] = probe(t.backend).optimizer_state_numel(t.engine)
    out["trainable_numel"] = sum(t.backend.shards.numel(p) for p in t.model.parameters() if p.requires_grad)
    out["wrapped_numel"] = sum(m.out_features * m.in_features for m in t.modules.values())
    out["w0"] = {n: full_master(t.backend, m, t.masters.shards[n]).clone() for n, m in t.modules.items()}
    out["codes_switch"] = {n: _codes(m.qweight) for n, m in t.modules.items()}
    out["scale"] = {n: m.scale for n, m in t.modules.items()}
    out["losses"] = torch.tensor([t.train_step(t.loader.next_batch())["loss"] for _ in range(3)])
    # The base's forward: a ReLoRALinear's output against x @ dequant(Wq)^T + s*B(Ax) computed here.
    name, m = next(iter(t.modules.items()))
    x = torch.randn(5, m.in_features, generator=torch.Generator().manual_seed(7)).to(m.lora_A.dtype)
    A, B = t.backend.shards.gather_fp32(m.lora_A), t.backend.shards.gather_fp32(m.lora_B)  # collective
    with torch.no_grad(), probe(t.backend).gathered_params([m.lora_A, m.lora_B]):  # ZeRO-3: partitioned
        got = m(x).float()
        ref = x.float() @ m.qweight.dequantize().t() + m.scale * (x.float() @ A.t()) @ B.t()
    out["forward_maxdiff"] = float((got - ref).abs().max() / ref.abs().max())

    start_masters = {n: s.clone() for n, s in t.masters.shards.items()}
    start_q = {n: m.qweight for n, m in t.modules.items()}
    out["start"] = {n: full_master(t.backend, m, t.masters.shards[n]).clone() for n, m in t.modules.items()}
    for mode in ("master", "reference"):
        for n, s in start_masters.items():
            t.masters.shards[n].copy_(s)
            t.modules[n].qweight = start_q[n]
        t.masters.quant_merge = mode
        drift, adapters = [], []
        for k in range(1, resets + 1):
            adapters.append(_set_adapters(t, k, magnitude))
            steps.merge_adapters(t.backend, t.modules, t.masters)
            drift.append(_drift(t))
        out[f"drift_{mode}"] = {n: torch.tensor([d[n] for d in drift]) for n in t.modules}
        out[f"codes_{mode}"] = {n: _codes(m.qweight) for n, m in t.modules.items()}
        out["adapters"] = {n: [(a[n][0], a[n][1]) for a in adapters] for n in t.modules}
    t.masters.quant_merge = cfg.relora.quant_merge
    dist.barrier()
    return out


def _moments(t: Trainer) -> dict:
    """This rank's dequantized fragments of every adapter's moments: {name: {key: (start, values)}}."""
    out = {}
    for name, m in t.modules.items():
        for pname, p in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            out[f"{name}.{pname}"] = {k: tuple(t.backend.optimizer_state.local_state(p, k)) for k in ("exp_avg", "exp_avg_sq")}
    return out


def adam8_checks(cfg, template, info) -> dict:
    """AdamW8bit through warm start and switch, then the optimizer reset on the 8-bit state, a
    checkpoint, and a second Trainer resuming it."""
    t = Trainer(cfg, template, info)
    losses = [t.train_step(t.loader.next_batch())["loss"] for _ in range(cfg.relora.warm_start_steps)]
    t.switch_to_relora()
    losses += [t.train_step(t.loader.next_batch())["loss"] for _ in range(3)]
    inner = probe(t.backend).inner_optimizer(t.engine)
    out: dict = {"rank": info.rank, "losses": torch.tensor(losses), "optimizer": type(inner).__name__}
    out["state_dtypes"] = sorted({str(s["state1"].dtype) for s in inner.state.values()})
    # The engine-neutral listing the bench and the memory model read must see the 8-bit state.
    from relora_dist.bench.memory import engine_tensor_bytes

    out["listed_optimizer_bytes"] = engine_tensor_bytes(t)["optimizer_state"]
    out["inner_state_bytes"] = sum({v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
                                    for s in inner.state.values() for v in s.values()
                                    if torch.is_tensor(v) and v.numel() > 0}.values())
    t.backend.optimizer_state.link_fragments(t.engine)
    out["numels"] = {f"{n}.{pn}": p.numel() for n, m in t.modules.items()
                     for pn, p in (("lora_A", m.lora_A), ("lora_B", m.lora_B))}
    out["pre"] = _moments(t)
    steps.prune_adapter_moments(t.backend, t.modules, "magnitude", cfg.relora.prune_ratio, cfg.train.seed, 1)
    out["post"] = _moments(t)
    # Empty one whole block the way a prune that removes all of its entries does (codes set to the
    # map's exact 0, block scale kept): requantizing it gives scale 0, so only the raw state saved
    # beside the per-parameter moments restores it as it was.
    from relora_dist.backends.state8bit import mask_fragment

    inner_state = next(s for s in inner.state.values() if s.get("state1") is not None and s["state1"].dtype == torch.uint8
                       and s["absmax1"][0] > 0 and s["absmax2"][0] > 0)  # (unseen embedding rows have none)
    for key in ("exp_avg", "exp_avg_sq"):
        mask_fragment(inner_state, 0, 256, key, torch.zeros(256, dtype=torch.bool))
    raw = t.backend.optimizer_state.exact_local_state(t.engine)  # the live tensors: find the emptied state's name
    out["emptied"] = next(k.rpartition("/")[0] for k, v in raw.items() if v is inner_state["state1"])
    out["saved"] = _moments(t)
    out["raw_post"] = {k: v.clone() for k, v in t.backend.optimizer_state.exact_local_state(t.engine).items()}
    t.save_checkpoint()
    dist.barrier()
    t2 = Trainer(cfg, template, info)  # resumes the checkpoint just written
    t2.backend.optimizer_state.link_fragments(t2.engine)
    out["resumed"] = _moments(t2)
    out["raw_resumed"] = {k: v.clone() for k, v in t2.backend.optimizer_state.exact_local_state(t2.engine).items()}
    out["resumed_loss"] = t2.train_step(t2.loader.next_batch())["loss"]
    # What a resume at another world size does (the raw 8-bit state does not fit another partition):
    # requantize the per-parameter moments.
    state_class = type(t.backend.optimizer_state)
    exact = state_class.load_exact_local_state
    state_class.load_exact_local_state = lambda self, engine, tensors: False
    try:
        t3 = Trainer(cfg, template, info)
    finally:
        state_class.load_exact_local_state = exact
    t3.backend.optimizer_state.link_fragments(t3.engine)
    out["requantized"] = _moments(t3)
    out["raw_requantized"] = {k: v.clone() for k, v in t3.backend.optimizer_state.exact_local_state(t3.engine).items()}
    return out
