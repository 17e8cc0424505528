"""`train.compile`: `torch.compile` per decoder block, as torchtitan compiles a transformer.

Each decoder layer is compiled in place (`nn.Module.compile`), so parameter names, state dicts,
checkpoints and exports are those of the eager model, and the engines (ZeRO-2/3, FSDP2) shard and
hook the same modules. One compiled graph serves every layer: the layers share their code and
differ only in their parameters, which dynamo takes as graph inputs. What makes it recompile:

* HF's KV cache: with `use_cache` on, each layer passes its own `layer_idx` into the cache and
  dynamo specialises on it (one graph per layer). The engines call the model with
  `use_cache=False` (training needs no cache).
* The switch to ReLoRA: the adapters' `adapter_active` flag and which parameters require grad
  change, one recompile. A reset changes A's and B's values, not their shapes: no recompile.
* Evaluation (no grad) and a last micro-batch of another size: a graph each.

Checked on this machine (torch 2.13, DeepSpeed 0.19.8, CPU inductor through gcc), 2-layer tiny
model, 3 full-rank steps, 6 ReLoRA steps, 2 resets, fp32: losses within 5e-7 of eager under
ZeRO-2, ZeRO-3 and FSDP2 (tests/test_compile.py). ZeRO-2 and FSDP2 compile each layer into one
graph (2 graphs before the switch: train and eval; 3 after it; none added at resets). ZeRO-3
works but fragments: its parameter gathers are hooks on every Linear that DeepSpeed marks
`torch.compiler.disable` (deepspeed/runtime/zero/parameter_offload.py), so dynamo breaks the
block's graph at each of them (38 graphs before the switch instead of 2). DeepSpeed's own
`engine.compile()` compiles the whole model the same way. The quantized base (bitsandbytes) is
refused: not tested under torch.compile.
"""

from __future__ import annotations

import torch
from torch import nn

from relora_dist.config import Config, ConfigError

# Graphs one layer's code may keep before dynamo falls back to eager for good: train and eval, full
# rank and ReLoRA, a short last micro-batch each, with room to spare (torch's default is 8).
RECOMPILE_LIMIT = 16


def check_compile_config(cfg: Config) -> None:
    """One-line ConfigError for train.compile with what cannot be compiled here."""
    if not cfg.train.compile:
        return
    if cfg.relora.enabled and cfg.relora.base_quant != "none":
        raise ConfigError(f"train.compile=true with relora.base_quant={cfg.relora.base_quant}: the quantized base's "
                          f"bitsandbytes kernels are not tested under torch.compile; use relora.base_quant=none or "
                          f"train.compile=false")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.get_decoder().layers)


def compile_blocks(model: nn.Module) -> int:
    """Compile every decoder layer of `model` in place; returns how many."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)
