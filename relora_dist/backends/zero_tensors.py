"""Every tensor a DeepSpeed ZeRO engine holds on one rank, named and sorted by kind
(`ZeroProbe.held_tensors`, read by tools/bench.py's byte count).

DeepSpeed keeps its state in attributes of its optimizer wrapper (flat fp32 partitions, Adam
state keyed by those flats, bit16 groups, communication buckets) and on the module's params
(`ds_tensor` partitions under ZeRO-3). Rather than name each attribute of one DeepSpeed version,
the optimizer object graph is walked (DeepSpeed and torch.optim objects only, 6 levels deep) and
each tensor is classified by the path it was reached through. The caller counts each storage once.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch


def _walk(obj: Any, path: str, out: list, seen: set, depth: int = 0) -> None:
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        if obj.grad is not None:
            out.append((path + ".grad", obj.grad))
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            _walk(v, f"{path}[{'tensor' if isinstance(k, torch.Tensor) else k}]", out, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", out, seen, depth + 1)
    elif (hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type))
          and type(obj).__module__.startswith(("deepspeed", "torch.optim", "bitsandbytes"))):
        for k, v in list(vars(obj).items()):
            _walk(v, f"{path}.{k}", out, seen, depth + 1)


def _category(path: str) -> str:
    top = path.split("[")[0]
    low = path.lower()
    if top.startswith("opt.optimizer.state"):
        return "optimizer_state"
    if top.startswith("opt.optimizer.param_groups"):  # the inner optimizer's params = fp32 flats
        return "fp32_master"
    if top in ("opt.single_partition_of_fp32_groups", "opt.fp32_partitioned_groups_flat"):
        return "grads" if path.endswith(".grad") else "fp32_master"
    # DeepSpeed's reduction buckets (`ipg_*`: a torch.empty of reduce_bucket_size elements, mostly
    # never touched on CPU) are reported apart from the training state.
    if "ipg" in low or "bucket" in low:
        return "comm_buffers"
    if path.endswith(".grad") or "grad" in top.lower():
        return "grads"
    if path.startswith("module.") and path.endswith(".data") and "gathered" in path:
        return "gathered_params"
    if any(k in top for k in ("bit16", "fp16", "lp_param", "param", "module.")):
        return "params"
    return "other"


def held_tensors(engine: Any, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(path, tensor, category) of the engine's optimizer graph and the module's params."""
    found: list[tuple[str, torch.Tensor]] = []
    _walk(engine.optimizer, "opt", found, set())
    for path, t in found:
        # A ZeRO-3 param met outside the module walk (fp16_groups, param_dict): its .data is the
        # full tensor gathered at this moment, or empty; its partition is counted via ds_tensor.
        yield path, t, "gathered_params" if hasattr(t, "ds_tensor") else _category(path)
    for name, p in model.named_parameters():
        if hasattr(p, "ds_tensor"):
            yield f"module.{name}.ds_tensor", p.ds_tensor, _category(f"module.{name}.ds_tensor")
            if p.data.numel() > 0:  # ZeRO-3 param gathered at this moment (transient)
                path = f"module.{name}.gathered.data"
                yield path, p.data, _category(path)
        else:
            yield f"module.{name}.data", p.data, _category(f"module.{name}.data")
        if p.grad is not None:
            yield f"module.{name}.grad", p.grad, _category(f"module.{name}.grad")
