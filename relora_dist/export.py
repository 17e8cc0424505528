"""Hugging Face export of a live run: consolidate shards, merge live adapters in fp32, save."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from relora_dist.quant_steps import full_master
from relora_dist.relora import lora_delta


def full_state_dict(trainer) -> dict[str, torch.Tensor]:
    """fp32 HF-named state dict with live adapters merged (W + s*B*A). Collective: every rank calls
    it; the result is complete on every rank. Trainable params come from the optimizer's fp32
    masters, frozen wrapped weights from the fp32 merge masters when kept."""
    backend, engine, masters = trainer.backend, trainer.engine, trainer.masters
    sd: dict[str, torch.Tensor] = {}
    for name, p in trainer.model.named_parameters():
        if ".lora_" in name:
            continue
        module_name = name.rsplit(".", 1)[0]
        if engine is not None and p.requires_grad:
            sd[name] = backend.full_fp32(p).reshape(backend.shape(p)).cpu()
        elif masters is not None and masters.kept and module_name in masters.shards and name.endswith("weight"):
            shape = backend.shape(p)
            sd[name] = backend.gather_owned(p, masters.shards[module_name].to(p.device)).view(shape).cpu()
        else:
            sd[name] = backend.gather_full(p).cpu()
    for module_name, m in trainer.modules.items():
        if m.qweight is not None:  # a quantized base: its fp32 master is the weight (never dequantized bytes)
            sd[f"{module_name}.weight"] = full_master(backend, m, masters.shards[module_name]).cpu()
    for module_name, m in trainer.modules.items():
        if m.adapter_active:
            A, B = backend.full_fp32(m.lora_A).cpu(), backend.full_fp32(m.lora_B).cpu()
            sd[f"{module_name}.weight"] = sd[f"{module_name}.weight"] + lora_delta(A, B, m.scale)
    return sd


def export_hf(trainer, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path | None:
    """Write config.json, model.safetensors (sharded above 2 GB), generation_config.json and the
    tokenizer files to out_dir on rank 0. Collective."""
    from transformers import LlamaForCausalLM

    sd = full_state_dict(trainer)
    out_dir = Path(out_dir)
    if trainer.info.is_main:
        with torch.device("meta"):
            model = LlamaForCausalLM(trainer.model_config)
        model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
        model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="2GB")
        for f in Path(trainer.tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, out_dir / f.name)
    if dist.is_initialized():
        dist.barrier()
    return out_dir
