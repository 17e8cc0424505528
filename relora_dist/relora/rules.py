"""ReLoRA's setting rules, in one place: adapter hyperparameters, target selection against a model's
Linear layers, optimizer-state pruning, and the relora.* config keys built on them.

The same functions check a Python caller's arguments at run time (relora/layer.py's wrap_model and
relora/algebra.py's prune_keep raise ReLoRAConfigError) and a run config before any work
(check_relora_config and check_relora_targets raise ConfigError, naming config keys). `keys`
renames the arguments in the messages; with keys, values are echoed as typed on the command line
(no Python escaping).
"""

from __future__ import annotations

import difflib
import math
import numbers
import re

import torch
from torch import nn

from relora_dist.config import DEFAULT_TARGETS, PRUNE_THRESHOLDS, REINITS, ConfigError  # noqa: F401

#: DEFAULT_TARGETS (config.py): Hugging Face LLaMA attention and MLP projections (what the
#: reference wraps for LLaMA).

PRUNE_MODES = ("zero", "random", "magnitude")

# PRUNE_THRESHOLDS (how magnitude pruning finds its threshold) and REINITS (how a reset
# re-initialises the adapter) are the words of relora.prune_threshold and relora.reinit (config.py).


class ReLoRAConfigError(ValueError):
    """A ReLoRA setting is invalid; the message names the problem and the fix on one line."""


def check_hparams(r: int, alpha: float, dropout: float, keys: dict[str, str] | None = None) -> None:
    k = {"r": "LoRA rank r", "alpha": "lora alpha", "dropout": "lora dropout", **(keys or {})}
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ReLoRAConfigError(f"{k['r']}={r!r} must be an integer >= 1 (reference default 128)")
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise ReLoRAConfigError(f"{k['alpha']}={alpha!r} must be finite and > 0 (scale = alpha / r; reference 32)")
    if not (isinstance(dropout, numbers.Real) and 0.0 <= dropout < 1.0):
        raise ReLoRAConfigError(f"{k['dropout']}={dropout!r} must be in [0, 1) (reference 0.1)")


def check_prune(mode: str, p: float, keys: dict[str, str] | None = None, allow_none: bool = False) -> None:
    """The optimizer reset's prune mode and fraction (`allow_none`: the config's 'none' = no reset)."""
    k = {"mode": "optimizer prune mode", "p": "prune fraction p", **(keys or {})}
    modes = PRUNE_MODES + (("none",) if allow_none else ())
    if mode not in modes:
        raise ReLoRAConfigError(f"unknown {k['mode']} '{mode}': use one of {', '.join(modes)}")
    if not (isinstance(p, numbers.Real) and 0.0 <= p <= 1.0):
        raise ReLoRAConfigError(f"{k['p']}={p!r} must be in [0, 1] (e.g. 0.9 or 0.99)")


def check_prune_threshold(rule: str, key: str = "magnitude threshold rule") -> None:
    if rule not in PRUNE_THRESHOLDS:
        raise ReLoRAConfigError(f"unknown {key} '{rule}': use one of {', '.join(PRUNE_THRESHOLDS)}")


def module_pattern(name: str) -> str:
    """model.layers.3.mlp.up_proj -> model.layers.N.mlp.up_proj (to list names compactly)."""
    return re.sub(r"\.\d+\.", ".N.", name)


def select_targets(model: nn.Module, patterns: list[str] | None, r: int, keys: dict[str, str] | None = None,
                   where: str = "") -> dict[str, nn.Linear]:
    """{name: nn.Linear} of every Linear whose qualified name matches a pattern (re.search); raises
    ReLoRAConfigError unless the patterns are a non-empty list of valid regexes that each match a
    plain nn.Linear and r fits every matched layer. `where` describes the model in the rank message
    (the config check names the preset and its sizes). Modifies nothing."""
    k = {"targets": "target_patterns", "pattern": "target", "r": "r", **(keys or {})}
    show = (lambda s: f"'{s}'") if keys else repr
    if isinstance(patterns, str):
        raise ReLoRAConfigError(f"{k['targets']}={patterns!r} is a string: pass a list of regexes, e.g. {DEFAULT_TARGETS}")
    if not patterns:
        raise ReLoRAConfigError(f"{k['targets']} is empty: give a non-empty list of regexes, e.g. "
                                f"'{','.join(DEFAULT_TARGETS)}'")
    compiled = []
    for pat in patterns:
        try:
            compiled.append(re.compile(pat))
        except re.error as e:
            raise ReLoRAConfigError(f"{k['pattern']} pattern {show(pat)} is not a valid regex ({e}): fix the pattern "
                                    f"(re.search over module names, e.g. 'self_attn\\.q_proj$')") from None
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    kinds = sorted(set(module_pattern(n) for n in linears))
    chosen: dict[str, nn.Linear] = {}
    for pat, rx in zip(patterns, compiled):
        hits = [n for n in linears if rx.search(n)]
        if not hits:
            close = difflib.get_close_matches(pat, kinds, n=1, cutoff=0.3)
            few = ", ".join(kinds[:12]) + (f", ... ({len(kinds)} in all)" if len(kinds) > 12 else "")
            raise ReLoRAConfigError(
                f"{k['pattern']} pattern {show(pat)} matches no nn.Linear module: fix or drop it"
                + (f" (closest: '{close[0]}')" if close else "") + f"; available Linear names: {few or '(none)'}")
        chosen.update((n, linears[n]) for n in hits)
    for n, m in sorted(chosen.items()):
        if type(m) is not nn.Linear:
            raise ReLoRAConfigError(
                f"module {n!r} is a {type(m).__name__} (an nn.Linear subclass whose forward may bypass "
                f"ours): exclude it from {k['targets']}")
    # The smallest targeted layer bounds r: naming it gives a fix that holds for every layer.
    n, m = min(chosen.items(), key=lambda kv: (min(kv[1].in_features, kv[1].out_features), kv[0]))
    max_r = min(m.in_features, m.out_features)
    if r > max_r:
        raise ReLoRAConfigError(
            f"{k['r']}={r} exceeds min(in, out) for module {n!r} (weight [{m.out_features}, {m.in_features}]): "
            f"use {k['r']} <= {max_r} or exclude the module" + (f" (min(in, out)={max_r} with {where})" if where else ""))
    return chosen


_KEYS = {"r": "relora.r", "alpha": "relora.alpha", "dropout": "relora.dropout", "targets": "relora.targets",
         "pattern": "relora.targets", "mode": "relora.optimizer_reset", "p": "relora.prune_ratio",
         "threshold": "relora.prune_threshold"}


def check_relora_config(cfg) -> None:
    """relora.r/alpha/dropout and the optimizer reset, by the rules wrap_model, prune_keep and
    magnitude_threshold apply."""
    r = cfg.relora
    try:
        check_hparams(r.r, r.alpha, r.dropout, _KEYS)
        check_prune(r.optimizer_reset, r.prune_ratio, _KEYS, allow_none=True)
        check_prune_threshold(r.prune_threshold, _KEYS["threshold"])
    except ReLoRAConfigError as e:
        raise ConfigError(str(e)) from None
    if r.reinit_micro_batches < 0:
        raise ConfigError(f"relora.reinit_micro_batches={r.reinit_micro_batches} must be >= 0 (0 = all micro-batches)")
    if r.reinit == "project" and cfg.optimizer.name != "adamw":
        raise ConfigError(f"relora.reinit=project carries Adam moments, which optimizer.name={cfg.optimizer.name} "
                          f"does not keep in fp32: use optimizer.name=adamw or relora.reinit=gradient")


def check_relora_targets(cfg, model_config) -> None:
    """relora.targets and relora.r against the model the run builds (on the meta device: no memory),
    and that bitsandbytes can pack every targeted weight when relora.base_quant is set."""
    from transformers import AutoModelForCausalLM

    from relora_dist.relora.quant import check_packs

    m = cfg.model
    source = f"model.init_from={m.init_from}" if m.init_from else f"model.preset={m.preset}"
    where = f"{source}, hidden {model_config.hidden_size}, intermediate {model_config.intermediate_size}"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    try:
        chosen = select_targets(model, cfg.relora.targets, cfg.relora.r, _KEYS, where)
    except ReLoRAConfigError as e:
        raise ConfigError(str(e)) from None
    if getattr(model_config, "tie_word_embeddings", False) and "lm_head" in chosen:
        raise ConfigError("relora.targets matches lm_head, which is tied to the input embeddings "
                          "(tie_word_embeddings): its weight trains as the embedding (relora.train_extra); "
                          "drop lm_head from relora.targets")
    problem = check_packs({n: (mod.out_features, mod.in_features) for n, mod in chosen.items()},
                          cfg.relora.base_quant)
    if problem:
        raise ConfigError(problem)
