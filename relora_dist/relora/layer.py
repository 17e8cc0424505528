"""Backend-agnostic ReLoRA building blocks.

ReLoRA (Lialin et al., "ReLoRA: High-Rank Training Through Low-Rank Updates", arXiv 2307.05695, §3)
trains a frozen base weight ``W`` plus a low-rank adapter ``s * B @ A`` and periodically merges the
adapter into ``W`` (``W <- W + s*B@A``), re-initialises it (A ~ Kaiming-uniform, B = 0), partially
resets the adapters' optimizer state and re-warms the learning rate.  The sum of many rank-r updates
can reach a high rank.

This module holds the wrapped linear layer and the model-level helpers (wrapping, freezing per
phase); the tensor algebra (draws of A, merge deltas, prune masks, rank diagnostics) lives in
relora/algebra.py and is re-exported here. The engine-specific merge and optimizer reset live
elsewhere and call these.

Deliberate difference from the reference implementation (github Guitaricet/relora): A is
Kaiming-uniform and B is zero at wrap time. The reference zeroes BOTH
(github.com/Guitaricet/relora/issues/18), so every adapter gradient of the first cycle is exactly
zero and the first cycle trains no adapter. (The algebra's own differences: relora/algebra.py.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The rules (hyperparameters, target selection, pruning) live in relora/rules.py, shared with the
# start-up config check, and the tensor algebra in relora/algebra.py; re-exported here as part of
# this module's API.
from relora_dist.relora.algebra import (cumulative_rank, draw_lora_A, effective_rank, flat_slice_delta,
                                        lora_delta, lora_delta_rows, magnitude_threshold, prune_generator,
                                        prune_keep, prune_mask)
from relora_dist.relora.rules import (DEFAULT_TARGETS, PRUNE_MODES, PRUNE_THRESHOLDS, ReLoRAConfigError,
                                      check_hparams, select_targets)

__all__ = [
    "DEFAULT_TARGETS",
    "PRUNE_MODES",
    "PRUNE_THRESHOLDS",
    "ReLoRAConfigError",
    "ReLoRALinear",
    "wrap_model",
    "relora_modules",
    "set_adapters_active",
    "freeze_for_relora_phase",
    "freeze_for_full_rank",
    "draw_lora_A",
    "lora_delta",
    "lora_delta_rows",
    "flat_slice_delta",
    "prune_mask",
    "prune_keep",
    "magnitude_threshold",
    "prune_generator",
    "cumulative_rank",
    "effective_rank",
]

# --------------------------------------------------------------------------------------------------
# The wrapped linear layer
# --------------------------------------------------------------------------------------------------

class ReLoRALinear(nn.Module):
    """``y = x W^T + b  [+ scale * B(A(dropout(x)))  when adapter_active]``.

    The base parameters keep the names ``weight`` and ``bias`` (and are the *same* Parameter objects as
    the replaced ``nn.Linear``: nothing is copied), so state-dict keys stay e.g.
    ``model.layers.0.self_attn.q_proj.weight``.  ``lora_A`` is ``[r, in]``, ``lora_B`` is ``[out, r]``,
    ``scale = alpha / r``.  The adapters are created inactive and frozen, so a model can be wrapped
    before the first DeepSpeed engine is built (ZeRO needs the final parameter set) and still train
    full-rank during the warm start.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, *,
                 name: str = "", seed: int = 0):
        super().__init__()
        check_hparams(r, alpha, dropout)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight  # same Parameter object: no copy
        if base.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = base.bias  # same Parameter object
        self.r = int(r)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.r
        #: Qualified name used as the seed key for every draw of A; set by wrap_model.  Use it (not a
        #: name taken from an engine-wrapped model, which gains a "module." prefix) when re-drawing A.
        self.relora_name = name
        self.adapter_active = False
        w = base.weight
        # Paper §3; github.com/Guitaricet/relora/issues/18: A ~ Kaiming-uniform(a=sqrt(5)), B = 0, so the wrapped model computes
        # exactly what the unwrapped one did while the gradient w.r.t. B is non-zero on step one.
        a = draw_lora_A((self.r, self.in_features), seed, 0, name)
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype), requires_grad=False)
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, self.r, device=w.device, dtype=w.dtype), requires_grad=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        #: The quantized frozen base (relora_dist.relora.quant.QuantizedWeight) once quantize_base ran; a
        #: plain attribute, invisible to DeepSpeed, .to() and state_dict.
        self.qweight = None
        self.quant_compute_dtype = None
        #: A relora_dist.relora.reinit.GradSketch while the step before a gradient re-init runs, else None.
        self.grad_sketch = None
        self.train(base.training)  # inherit train/eval mode (new modules default to train)

    def quantize_base(self, qweight, compute_dtype: torch.dtype | None) -> None:
        """Hold the frozen base as `qweight` (a relora_dist.relora.quant.QuantizedWeight) from now on. The
        `weight` Parameter is removed, so no engine sees or stores it; `self.weight` becomes a
        meta-device tensor that only carries the shape (reading its values fails loudly: they live
        in the fp32 merge masters). Later calls just swap the quantized tensor (a requantization)."""
        if "weight" in self._parameters:
            del self._parameters["weight"]  # (a ZeRO-3 partitioned Parameter's .shape is [0])
            object.__setattr__(self, "weight", torch.empty(self.out_features, self.in_features, device="meta"))
        self.qweight = qweight
        self.quant_compute_dtype = compute_dtype

    def forward(self, x: Tensor) -> Tensor:
        if self.qweight is not None:
            from relora_dist.relora.quant import quantized_linear

            out = quantized_linear(x, self.qweight, self.quant_compute_dtype)
            if self.bias is not None:
                out = out + self.bias
        elif self.adapter_active and isinstance(self.lora_dropout, nn.Identity):
            out = _AdaptedLinear.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale)
            if self.grad_sketch is not None:
                self.grad_sketch.observe(x, out)
            return out
        else:
            out = F.linear(x, self.weight, self.bias)
        if self.adapter_active:
            out = out + self.scale * F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        if self.grad_sketch is not None:
            self.grad_sketch.observe(x, out)
        return out

    def extra_repr(self) -> str:
        p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, alpha={self.alpha:g}, "
                f"scale={self.scale:g}, dropout={p:g}, adapter_active={self.adapter_active}")


class _AdaptedLinear(torch.autograd.Function):
    """``x W^T + b + scale * (x A^T) B^T`` (no dropout) in fewer operator launches than the same
    formula through autograd: forward mm(x, A^T), mm / addmm(b, x, W^T), then the scaled adapter
    product added in place (addmm_ with alpha=scale); backward folds the scale into the
    matmuls (addmm with beta=0, alpha=scale) and x's two gradient terms into one addmm_.

    Why: the ReLoRA step is host-bound on a GPU (docs/benchmarks.md, "Operator launches per step").
    Autograd over ``out + scale * F.linear(F.linear(x, A), B)`` launches 5 ops forward and 7 backward
    per wrapped linear (base mm, 2 adapter mm, mul, add; then the mul's backward, 4 adapter mm, the
    base's input-gradient mm and the add that sums x's two gradients); this launches 3 and 5 (with
    W frozen), 4 fewer per linear: 672 per step at the 350m structure (168 wrapped linears; measured
    7,896 -> 7,224 launches per ReLoRA step under ZeRO-2, rank 0 of 2). Equal in fp64 to the
    autograd formula (tests/test_relora.py). A plain `torch.addmm(out, h, B^T, alpha=scale)` in
    the autograd formula saves 2 forward launches but adds 3 backward (alpha's two muls and an
    accumulation): 1 more in all, measured on one layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale):
        x2 = x.reshape(-1, x.shape[-1])
        h = torch.mm(x2, lora_A.t())
        out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        out.addmm_(h, lora_B.t(), alpha=scale)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, h)
        ctx.scale = scale
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, lora_A, lora_B, h = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = ga = gbb = None
        # d/dh = scale * g B; beta=0 ignores the input (h only lends its shape), no separate mul.
        gh = torch.addmm(h, g, lora_B, beta=0, alpha=ctx.scale) if need_x or need_a else None
        if need_x:
            gx = torch.mm(g, weight).addmm_(gh, lora_A).view(*grad.shape[:-1], x2.shape[-1])
        if need_w:
            gw = torch.mm(g.t(), x2)
        if need_b:
            gb = g.sum(0)
        if need_a:
            ga = torch.mm(gh.t(), x2)
        if need_bb:
            gbb = torch.addmm(lora_B, g.t(), h, beta=0, alpha=ctx.scale)
        return gx, gw, gb, ga, gbb, None


# --------------------------------------------------------------------------------------------------
# Model-level helpers
# --------------------------------------------------------------------------------------------------

def wrap_model(model: nn.Module, target_patterns: list[str] | None, r: int, alpha: float,
               dropout: float, *, seed: int = 0) -> list[str]:
    """Replace every ``nn.Linear`` whose qualified name matches any pattern (``re.search``) by a
    ReLoRALinear (adapters inactive and frozen).  ``target_patterns=None`` means DEFAULT_TARGETS.

    All checks run before the model is modified.  Returns the sorted wrapped module names.
    """
    check_hparams(r, alpha, dropout)
    if relora_modules(model):
        raise ReLoRAConfigError("model is already ReLoRA-wrapped: call wrap_model only once per model")
    chosen = select_targets(model, DEFAULT_TARGETS if target_patterns is None else target_patterns, r)
    for n, m in chosen.items():
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ReLoRALinear(m, r, alpha, dropout, name=n, seed=seed))
    return sorted(chosen)


def relora_modules(model: nn.Module) -> dict[str, ReLoRALinear]:
    """Qualified name -> ReLoRALinear, in module order (names as seen from ``model``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ReLoRALinear)}


def set_adapters_active(model: nn.Module, active: bool) -> None:
    for m in relora_modules(model).values():
        m.adapter_active = bool(active)


def _param_roles(model: nn.Module) -> tuple[set[int], set[int]]:
    mods = relora_modules(model).values()
    lora = {id(p) for m in mods for p in (m.lora_A, m.lora_B)}
    base = {id(p) for m in mods for p in (m.weight, m.bias) if isinstance(p, nn.Parameter)}
    return lora, base


def freeze_for_relora_phase(model: nn.Module, train_extra: bool) -> list[str]:
    """ReLoRA phase: lora_A/lora_B trainable; base weight/bias of wrapped linears frozen; every other
    parameter (embeddings, norms, lm_head, unwrapped linears) gets ``requires_grad=train_extra``
    (the reference trains them, so default callers should pass True).  A parameter tied to a wrapped
    base weight is frozen.  Does not touch ``adapter_active``.  Returns trainable parameter names
    (``named_parameters`` order, tied parameters listed once)."""
    lora, base = _param_roles(model)
    if not lora:
        raise ReLoRAConfigError("model has no ReLoRALinear modules: call wrap_model before freeze_for_relora_phase")
    for p in model.parameters():
        p.requires_grad_(id(p) in lora or (id(p) not in base and bool(train_extra)))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def freeze_for_full_rank(model: nn.Module) -> list[str]:
    """Full-rank (warm start) phase: every parameter trainable except lora_A/lora_B.  Returns the
    trainable parameter names."""
    lora, _ = _param_roles(model)
    for p in model.parameters():
        p.requires_grad_(id(p) not in lora)
    return [n for n, p in model.named_parameters() if p.requires_grad]


