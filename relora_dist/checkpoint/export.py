"""Hugging Face export: one consolidation and one writer for both ways a model leaves a run.

    live     the warm-start export during training: full_state_dict(ModelState), collective
    offline  relora-convert (tools/convert_ckpt.py): checkpoint.consolidated_state_dict(ShardReader)

Both give `merged_state_dict` the same two things, fp32 full weights by HF name and the live
adapters (A, B, scale), so an adapter is merged as W + relora.lora_delta(A, B, scale) the same way
whichever side reads it; a quantized frozen base contributes its fp32 master (quant_steps.full_master),
never dequantized bytes. `write_hf` then writes config.json, model.safetensors (sharded above
max_shard_size), generation_config.json and the tokenizer files, or a bitsandbytes-quantized folder.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from relora_dist.checkpoint.integrity import architecture
from relora_dist.relora.quant_steps import full_master
from relora_dist.relora.layer import lora_delta
from relora_dist.data.tokenizer import TOKENIZER_FILES, tokenizer_files

Adapter = tuple[str, torch.Tensor, torch.Tensor, float]
"""(wrapped module name, full fp32 A, full fp32 B, scale)"""


class ModelConfigMismatch(ValueError):
    """The model config does not describe the state dict's tensors (names or shapes)."""


def merged_state_dict(weights: Iterable[tuple[str, torch.Tensor]], adapters: Iterable[Adapter]) -> dict[str, torch.Tensor]:
    """fp32 HF-named state dict: the weights, each live adapter merged into its module's weight."""
    sd = dict(weights)
    for module, A, B, scale in adapters:
        sd[f"{module}.weight"] = sd[f"{module}.weight"] + lora_delta(A, B, scale)
    return sd


# --- live: from the sharded state of a running job -----------------------------------------------------
def full_state_dict(model) -> dict[str, torch.Tensor]:
    """fp32 HF-named state dict of a state.ModelState, live adapters merged. Collective: every rank
    calls it (in the same order: the generators gather one tensor at a time) and gets all of it.
    Trainable params come from the optimizer's fp32 masters, frozen wrapped weights from the fp32
    merge masters when kept."""
    return merged_state_dict(_live_weights(model), _live_adapters(model))


def _live_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    backend, engine, masters = model.backend, model.engine, model.masters
    for name, p in model.model.named_parameters():
        if ".lora_" in name:
            continue
        module_name = name.rsplit(".", 1)[0]
        if engine is not None and p.requires_grad:
            yield name, backend.shards.gather_fp32(p).reshape(backend.shards.shape(p)).cpu()
        elif masters is not None and masters.kept and module_name in masters.shards and name.endswith("weight"):
            shape = backend.shards.shape(p)
            yield name, backend.shards.gather_owned(p, masters.shards[module_name].to(p.device)).view(shape).cpu()
        else:
            yield name, backend.shards.gather_param(p).cpu()
    for module_name, m in model.modules.items():
        if m.qweight is not None:  # a quantized base: its fp32 master is the weight (never dequantized bytes)
            yield f"{module_name}.weight", full_master(backend, m, masters.shards[module_name]).cpu()


def _live_adapters(model) -> Iterator[Adapter]:
    for module_name, m in model.modules.items():
        if m.adapter_active:
            yield module_name, model.backend.shards.gather_fp32(m.lora_A).cpu(), model.backend.shards.gather_fp32(m.lora_B).cpu(), m.scale


def export_hf(state, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Export a running job (a state.CheckpointState) to out_dir, written by rank 0. Collective."""
    sd = full_state_dict(state.model)
    out_dir = Path(out_dir)
    if state.is_main:
        write_hf(sd, state.model_config, state.tokenizer_dir, out_dir, dtype)
    if dist.is_initialized():
        dist.barrier()
    return out_dir


# --- the writer ----------------------------------------------------------------------------------------
_EXPORT_NAME = re.compile(r"(config|generation_config)\.json|model(-\d{5}-of-\d{5})?\.safetensors"
                          r"|model\.safetensors\.index\.json\Z")


def foreign_files(folder: Path) -> list[str]:
    """What in `folder` an export does not write (links and sub-folders included): a folder with
    none is an earlier export (or empty) and may be replaced whole."""
    return sorted(p.name for p in folder.iterdir()
                  if p.is_symlink() or not p.is_file()
                  or not (_EXPORT_NAME.fullmatch(p.name) or p.name in TOKENIZER_FILES))


def _replace_dir(new: Path, target: Path) -> None:
    """Put the finished folder `new` at `target` by renames: a reader sees the old export or the
    new one, never a mix (an old model.safetensors beside new shards would be loaded instead)."""
    if not target.exists() and not target.is_symlink():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def write_hf(state_dict: dict[str, torch.Tensor], model_config, tokenizer_dir: str | Path, out_dir: str | Path,
             dtype: torch.dtype = torch.float32, max_shard_size: str = "2GB", quantize: str = "none") -> Path:
    """A folder AutoModelForCausalLM.from_pretrained loads: the causal LM of `model_config` (a
    transformers config, or its to_dict() as a manifest records it) holding `state_dict` in `dtype`, and every file of
    `tokenizer_dir`. quantize nf4|int8: a bitsandbytes folder made from the merged weights.
    Raises ModelConfigMismatch when the config does not fit the tensors.

    A config object is used as it is, not copied: saving records the architecture and dtype in it,
    and the live export has always left those in the run's config (later manifests record them).
    A dict keeps only the architecture fields (integrity.architecture: no auto_map, no code).

    The folder is written next to `out_dir` under a temporary name and renamed into place,
    replacing whatever `out_dir` held (callers decide whether it may be replaced); only the
    tokenizer's own files (TOKENIZER_FILES, regular files) are copied, never over a written one."""
    out_dir = Path(out_dir)
    model = hf_model(state_dict, model_config, dtype)
    # save_pretrained records the weights' dtype in config.json (no deprecated torch_dtype setter needed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if quantize == "none":
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        else:
            quantize_hf(model, tmp, quantize, max_shard_size)
        for name in tokenizer_files(tokenizer_dir):
            if not (tmp / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; an export is for others to read
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def hf_model(state_dict: dict[str, torch.Tensor], model_config, dtype: torch.dtype = torch.float32,
             device: str = "meta") -> torch.nn.Module:
    """The causal LM of `model_config` (a config, or a manifest's dict of one) holding `state_dict`
    in `dtype`, loaded strictly: what write_hf saves and relora-eval runs. device="meta" (saving)
    allocates nothing beyond the state dict; "cpu" also computes the buffers no state dict holds
    (the rotary inv_freq), which a forward needs. Raises ModelConfigMismatch."""
    from transformers import AutoModelForCausalLM

    from relora_dist.model import config_from_dict

    try:
        config = config_from_dict(architecture(model_config)) if isinstance(model_config, dict) else model_config
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(_tie(state_dict, config, dtype), strict=True, assign=True)
        if config.tie_word_embeddings:
            model.tie_weights()  # assign=True gave lm_head its own Parameter: one tensor again
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise ModelConfigMismatch(f"model_config does not describe the saved tensors "
                                  f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    return model


def _tie(state_dict: dict[str, torch.Tensor], config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict in `dtype`; under tied embeddings lm_head is the embedding tensor itself. A run
    holds the tied pair as one parameter (named once: model.embed_tokens.weight), so its state dicts
    have no lm_head.weight; one that has it must hold the same values."""
    sd = {k: v.to(dtype) for k, v in state_dict.items()}
    if getattr(config, "tie_word_embeddings", False) and "model.embed_tokens.weight" in sd:
        emb = sd["model.embed_tokens.weight"]
        head = sd.get("lm_head.weight")
        if head is not None and not torch.equal(head, emb):
            raise ValueError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
        sd["lm_head.weight"] = emb
    return sd


def nf4_unpackable(model) -> list[str]:
    """Linear layers bitsandbytes' CPU 4-bit inference layout cannot hold (it packs rows in groups
    of 32 and needs in_features a multiple of the 64-element block: functional.
    _convert_weight_packed_for_cpu asserts both in bitsandbytes 0.50.2)."""
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                  and (m.out_features % 32 or m.in_features % 64))


def quantize_hf(model, out_dir: Path, kind: str, max_shard_size: str) -> None:
    """The merged full-precision model re-loaded by transformers with a bitsandbytes config (nf4:
    4-bit NF4, bf16 compute; int8: LLM.int8) and saved: a folder AutoModelForCausalLM.from_pretrained
    loads with its quantization config. lm_head stays unquantized (transformers' default), and for
    nf4 so does every layer nf4_unpackable lists (one line says which)."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from relora_dist.relora.quant import bnb

    bnb()  # silences its import-time log
    skip = ["lm_head"] + (nf4_unpackable(model) if kind == "nf4" else [])
    if kind == "nf4":
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                llm_int8_skip_modules=skip)
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    kept = [n for n in skip if n != "lm_head"]
    if kept:
        print(f"note: {len(kept)} linear layers stay in full precision (shape not packable by bitsandbytes' "
              f"4-bit CPU layout: out % 32 or in % 64): {', '.join(kept[:4])}{' ...' if len(kept) > 4 else ''}")
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        model.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
        quantized = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=qc)
        quantized.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
