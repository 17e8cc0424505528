"""Start-up validation of a run config: every check that needs no process group, world size or
DeepSpeed config, run before any work so a bad input costs nothing. Each failure is a one-line
ConfigError that names the key and the fix."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import numpy as np

from relora_dist.config import (
    OPTIMIZERS,
    PREPARE_HINT,
    _WEIGHT_FILES,
    Config,
    ConfigError,
    _suggest,
)
from relora_dist.model import PRESETS
from relora_dist.quant import BASE_QUANT, QUANT_MERGE, check_packs


def validate_config(cfg: Config) -> None:
    """Every check that needs no process group, world size or DeepSpeed config, before any work:
    values, data/tokenizer/model paths, prepared blocks vs seq_len and tokenizer, and ReLoRA targets
    and rank against the model's shapes (built on the meta device). Raises a one-line ConfigError
    that names the key and the fix."""
    _validate_values(cfg)
    _validate_checkpoint(cfg)
    vocab_size = _validate_data(cfg)
    model_config = _validate_model(cfg, vocab_size)
    if cfg.relora.enabled:
        _validate_relora_modules(cfg, model_config)


def _validate_values(cfg: Config) -> None:
    t, r, s, o, m = cfg.train, cfg.relora, cfg.schedule, cfg.optimizer, cfg.model
    if m.preset not in PRESETS:
        raise ConfigError(f"model.preset '{m.preset}' unknown: {_suggest(m.preset, list(PRESETS))}")
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads"):
        if getattr(m, key) < 0:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be >= 0 (0 = the preset's value)")
    if t.max_steps < 1:
        raise ConfigError(f"train.max_steps={t.max_steps} must be >= 1")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ConfigError(
            f"train.micro_batch_size={t.micro_batch_size} and train.global_batch_size={t.global_batch_size} "
            f"must be >= 1")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}; change one of them"
        )
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision '{t.precision}' unknown: use fp32, bf16 or auto")
    if t.grad_clip < 0:
        raise ConfigError(f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite '{t.on_nonfinite}' unknown: use stop or skip")
    if t.max_skipped_steps < 1:
        raise ConfigError(f"train.max_skipped_steps={t.max_skipped_steps} must be >= 1")
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every={t.eval_every} must be >= 0 (0 = only at the end)")
    if cfg.data.seq_len < 2:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} must be >= 2")
    if max(1, t.eval_tokens // cfg.data.seq_len) < t.micro_batch_size:
        raise ConfigError(
            f"train.eval_tokens={t.eval_tokens} is fewer than one micro-batch (train.micro_batch_size="
            f"{t.micro_batch_size} x data.seq_len={cfg.data.seq_len}); raise train.eval_tokens to at least "
            f"{t.micro_batch_size * cfg.data.seq_len} (x world size)")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
    if s.warmup_steps < 0:
        raise ConfigError(f"schedule.warmup_steps={s.warmup_steps} must be >= 0")
    if not 0 < s.min_lr_ratio <= 1:
        raise ConfigError(f"schedule.min_lr_ratio={s.min_lr_ratio} must be in (0, 1]")
    if o.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name '{o.name}' unknown: {_suggest(o.name, list(OPTIMIZERS))}")
    if o.lr <= 0:
        raise ConfigError(f"optimizer.lr={o.lr} must be > 0")
    if o.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(o, key) < 1:
            raise ConfigError(f"optimizer.{key}={getattr(o, key)} must be in [0, 1) (e.g. 0.9)")
    if o.eps <= 0:
        raise ConfigError(f"optimizer.eps={o.eps} must be > 0 (e.g. 1e-8)")
    if cfg.logging.peak_flops < 0:
        raise ConfigError(f"logging.peak_flops={cfg.logging.peak_flops} must be >= 0 (0 = guess from the hardware)")
    if cfg.logging.log_every < 1:
        raise ConfigError(f"logging.log_every={cfg.logging.log_every} must be >= 1")
    if not r.enabled:
        return
    if r.warm_start_steps < 0:
        raise ConfigError(f"relora.warm_start_steps={r.warm_start_steps} must be >= 0 (0 = no warm start)")
    if r.warm_start_steps >= t.max_steps:
        raise ConfigError(
            f"relora.warm_start_steps={r.warm_start_steps} leaves no ReLoRA steps in "
            f"train.max_steps={t.max_steps}; lower it or raise train.max_steps"
        )
    if r.optimizer_reset not in ("zero", "random", "magnitude", "none"):
        raise ConfigError(
            f"relora.optimizer_reset '{r.optimizer_reset}' unknown: use zero, random, magnitude or none"
        )
    if r.resets and r.optimizer_reset != "none" and o.name == "sgd":
        raise ConfigError(
            f"relora.optimizer_reset={r.optimizer_reset} with optimizer.name={o.name}: the optimizer reset "
            f"prunes Adam moments; use optimizer.name=adamw or relora.optimizer_reset=none"
        )
    if not 0 <= r.prune_ratio <= 1:
        raise ConfigError(f"relora.prune_ratio={r.prune_ratio} must be in [0, 1]")
    if r.merge_precision not in ("fp32", "bf16"):
        raise ConfigError(f"relora.merge_precision '{r.merge_precision}' unknown: use fp32 or bf16")
    if r.merge_master_device not in ("device", "cpu"):
        raise ConfigError(f"relora.merge_master_device '{r.merge_master_device}' unknown: use device or cpu")
    if r.merge_master_device == "cpu" and r.merge_precision == "bf16":
        raise ConfigError("relora.merge_master_device=cpu with relora.merge_precision=bf16: bf16 merges keep "
                          "no fp32 master to place; use merge_precision=fp32 or merge_master_device=device")
    if r.base_quant not in BASE_QUANT:
        raise ConfigError(f"relora.base_quant '{r.base_quant}' unknown: use one of {', '.join(BASE_QUANT)}")
    if r.quant_compute_dtype not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"relora.quant_compute_dtype '{r.quant_compute_dtype}' unknown: use auto, bf16 or fp32")
    if r.quant_merge not in QUANT_MERGE:
        raise ConfigError(f"relora.quant_merge '{r.quant_merge}' unknown: use one of {', '.join(QUANT_MERGE)}")
    if r.base_quant != "none" and r.merge_precision == "bf16":
        raise ConfigError(f"relora.base_quant={r.base_quant} with relora.merge_precision=bf16: there is no fp32 "
                          f"master to requantize from at each reset; use merge_precision=fp32")
    if r.warm_start_schedule not in ("paper", "anneal"):
        raise ConfigError(f"relora.warm_start_schedule '{r.warm_start_schedule}' unknown: use paper or anneal")
    if r.lr_restarts not in ("auto", "true", "false"):
        raise ConfigError(f"relora.lr_restarts '{r.lr_restarts}' unknown: use auto, true or false")
    if r.carry_optimizer_state not in ("auto", "true", "false"):
        raise ConfigError(f"relora.carry_optimizer_state '{r.carry_optimizer_state}' unknown: use auto, true or false")
    if r.carry_optimizer_state == "true" and o.name != "adamw":  # adamw8bit: 8-bit state is per flat partition
        raise ConfigError(f"relora.carry_optimizer_state=true with optimizer.name={o.name}: there are no Adam "
                          f"moments to carry; use optimizer.name=adamw or relora.carry_optimizer_state=false")
    if r.carry_optimizer_state == "true" and r.warm_start_steps == 0:
        raise ConfigError("relora.carry_optimizer_state=true with relora.warm_start_steps=0 (e.g. starting from "
                          "--init_from): this run has no warm-start optimizer state to carry; use "
                          "relora.carry_optimizer_state=false or auto")
    if r.phase_stage not in ("same", "3"):
        raise ConfigError(f"relora.phase_stage '{r.phase_stage}' unknown: use same or 3")
    if r.r < 1:
        raise ConfigError(f"relora.r={r.r} must be >= 1")
    if not r.alpha > 0:
        raise ConfigError(f"relora.alpha={r.alpha} must be > 0 (scale = alpha / r; reference 32)")
    if not 0 <= r.dropout < 1:
        raise ConfigError(f"relora.dropout={r.dropout} must be in [0, 1) (reference 0.1)")
    if r.lr < 0:
        raise ConfigError(f"relora.lr={r.lr} must be >= 0 (0 = 2 x optimizer.lr)")
    if r.effective_rank_every < -1:
        raise ConfigError(f"relora.effective_rank_every={r.effective_rank_every} must be >= -1 "
                          f"(0 = at resets, -1 = never)")
    if r.resets:
        _validate_relora_schedule(cfg)


def _validate_relora_schedule(cfg: Config) -> None:
    """The jagged-cosine constraints, named by config key (schedule.validate_jagged is the backstop)."""
    r, t = cfg.relora, cfg.train
    total, c = cfg.relora_steps, r.cycle_length
    if c < 1:
        raise ConfigError(f"relora.cycle_length={c} must be >= 1")
    if total % c:
        divisors = [d for d in range(1, total + 1) if total % d == 0]
        near = sorted(divisors, key=lambda d: (abs(d - c), d))[:2]
        steps = [x + r.warm_start_steps for x in ((total // c) * c, (total // c + 1) * c) if x > 0]
        raise ConfigError(
            f"the ReLoRA phase (train.max_steps={t.max_steps} - relora.warm_start_steps={r.warm_start_steps} "
            f"= {total} steps) is not a multiple of relora.cycle_length={c}; use train.max_steps="
            f"{' or '.join(map(str, steps))}, or relora.cycle_length={' or '.join(map(str, near))}")
    if not 0 <= r.first_warmup <= c:
        raise ConfigError(
            f"relora.first_warmup={r.first_warmup} must be in [0, relora.cycle_length={c}] (the first reset "
            f"would come before the warmup ends); use relora.first_warmup <= {c}")
    if r.restart_warmup < 1:
        raise ConfigError(
            f"relora.restart_warmup={r.restart_warmup} must be >= 1 (the LR must be 0 at each reset step); "
            f"use e.g. relora.restart_warmup={max(1, min(5, c - 1))}")
    if r.restart_warmup >= c:
        raise ConfigError(
            f"relora.restart_warmup={r.restart_warmup} must be shorter than relora.cycle_length={c}; "
            f"use 1 <= relora.restart_warmup <= {c - 1} or raise relora.cycle_length")
    from relora_dist.schedule import ScheduleError, validate_jagged

    try:
        validate_jagged(total=total, first_warmup=r.first_warmup, restart_warmup=r.restart_warmup,
                        cycle_length=c, min_lr_ratio=cfg.schedule.min_lr_ratio)
    except ScheduleError as e:  # pragma: no cover - the checks above cover its cases
        raise ConfigError(f"relora schedule: {e}") from None


def _validate_data(cfg: Config) -> int:
    """Tokenizer, data sources / prepared data; returns the tokenizer's vocabulary size."""
    from relora_dist.data import DEFAULT_CORPUS, DEFAULT_TOKENIZER, DataError, _builder_for
    from relora_dist.tokenizer import MODEL_FILE, load_tokenizer, tokenizer_checksum

    d = cfg.data
    tok_dir = d.tokenizer_dir or DEFAULT_TOKENIZER
    if not Path(tok_dir).is_dir():
        raise ConfigError(
            f"data.tokenizer_dir '{tok_dir}' does not exist; pass a folder with {MODEL_FILE} (train one with "
            f"tools/train_tokenizer.py --out {tok_dir}) or leave it empty for the bundled assets/tokenizer")
    if not (Path(tok_dir) / MODEL_FILE).is_file():
        raise ConfigError(
            f"data.tokenizer_dir '{tok_dir}' has no {MODEL_FILE}; pass a SentencePiece tokenizer folder (train "
            f"one with tools/train_tokenizer.py --out {tok_dir}) or leave it empty for the bundled one")
    try:
        vocab_size = load_tokenizer(tok_dir).vocab_size
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError
        raise ConfigError(
            f"data.tokenizer_dir '{tok_dir}': {MODEL_FILE} is not a SentencePiece model "
            f"({' '.join(str(e).split())[:120]}); retrain it with tools/train_tokenizer.py") from None

    if not d.prepared_dir:
        for src in d.sources or [DEFAULT_CORPUS]:
            if not Path(src).is_file():
                raise ConfigError(
                    f"data.sources file '{src}' not found; pass an existing file (.txt, .jsonl, .jsonl.xz, "
                    f".parquet) or leave data.sources empty for the bundled corpus")
            if Path(src).stat().st_size == 0:
                raise ConfigError(f"data.sources file '{src}' is empty (0 bytes); pass a file with text, or drop it "
                                  f"from data.sources")
            try:
                _builder_for(src)
            except DataError as e:
                raise ConfigError(f"data.sources: {e}") from None
        return vocab_size

    pdir = Path(d.prepared_dir)
    hint = PREPARE_HINT.format(dir=d.prepared_dir, seq_len=d.seq_len) + f" --tokenizer {tok_dir}"
    if not pdir.is_dir():
        raise ConfigError(f"data.prepared_dir '{pdir}' does not exist; {hint} (or set data.prepared_dir='' "
                          f"to prepare data.sources on first use)")
    meta_path = pdir / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"data.prepared_dir '{pdir}' has no meta.json (not prepared, or preparation was "
                          f"interrupted); {hint}")
    try:
        meta = json.loads(meta_path.read_text())
        prepared, data_vocab = int(meta["seq_len"]), int(meta["vocab_size"])
        num_blocks, dtype = meta["num_blocks"], np.dtype(meta["dtype"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"data.prepared_dir '{pdir}': meta.json is unreadable ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:100]}); {hint}") from None
    from relora_dist.data import FORMAT_VERSION

    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"data.prepared_dir '{pdir}' has data format {meta.get('format_version')}, this code "
                          f"reads {FORMAT_VERSION}; {hint}")
    if d.seq_len > prepared:
        raise ConfigError(
            f"data.seq_len={d.seq_len} is longer than the prepared blocks ({prepared} tokens) in "
            f"data.prepared_dir '{pdir}'; use data.seq_len={prepared} (or a divisor of it), or "
            f"re-prepare: {PREPARE_HINT.format(dir='NEW_DIR', seq_len=d.seq_len)}")
    if prepared % d.seq_len:
        divisors = [x for x in range(2, prepared + 1) if prepared % x == 0]
        near = sorted(divisors, key=lambda x: (abs(x - d.seq_len), x))[:2]
        raise ConfigError(
            f"data.seq_len={d.seq_len} does not divide the prepared block length {prepared} in "
            f"data.prepared_dir '{pdir}'; use data.seq_len={' or '.join(map(str, sorted(near)))}, or "
            f"re-prepare: {PREPARE_HINT.format(dir='NEW_DIR', seq_len=d.seq_len)}")
    if data_vocab != vocab_size:
        raise ConfigError(
            f"data.prepared_dir '{pdir}' was tokenized with a vocabulary of {data_vocab} but data.tokenizer_dir "
            f"'{tok_dir}' has {vocab_size}; pass the tokenizer the data was prepared with, or re-prepare: {hint}")
    checksum = meta.get("tokenizer_checksum")
    if checksum and checksum != tokenizer_checksum(tok_dir):
        raise ConfigError(
            f"data.prepared_dir '{pdir}' was tokenized with a different tokenizer than data.tokenizer_dir "
            f"'{tok_dir}' (same vocabulary size {vocab_size}, different tokenizer.model checksum); pass the "
            f"tokenizer the data was prepared with, or re-prepare: {hint}")
    for split in ("train", "val"):
        if split not in num_blocks:
            raise ConfigError(f"data.prepared_dir '{pdir}': meta.json lists no '{split}' split; {hint}")
        f = pdir / f"{split}.bin"
        want = int(num_blocks[split]) * prepared * dtype.itemsize
        size = f.stat().st_size if f.is_file() else -1
        if size != want:
            raise ConfigError(f"data.prepared_dir '{pdir}': {f.name} has {size} bytes, meta.json expects {want} "
                              f"(missing or truncated); {hint}")
    train_blocks = int(num_blocks["train"]) * (prepared // d.seq_len)
    if train_blocks < cfg.train.global_batch_size:
        raise ConfigError(
            f"data.prepared_dir '{pdir}' has {train_blocks} training sequences of data.seq_len={d.seq_len}, "
            f"fewer than one global batch (train.global_batch_size={cfg.train.global_batch_size}); lower "
            f"train.global_batch_size or prepare more data")
    val_blocks = int(num_blocks["val"]) * (prepared // d.seq_len)
    if val_blocks < cfg.train.micro_batch_size:
        raise ConfigError(
            f"data.prepared_dir '{pdir}' has {val_blocks} validation sequences, fewer than one micro-batch "
            f"(train.micro_batch_size={cfg.train.micro_batch_size}); lower train.micro_batch_size or "
            f"re-prepare with a larger --val_fraction")
    return vocab_size


def _validate_model(cfg: Config, vocab_size: int):
    """model.init_from or the preset with overrides; returns the LlamaConfig the run will build."""
    from relora_dist.model import llama_config

    m = cfg.model
    if not m.init_from:
        try:
            return llama_config(m.preset, vocab_size, cfg.data.seq_len, m.hidden_size, m.intermediate_size,
                                m.num_layers, m.num_heads)
        except ValueError:
            hidden = m.hidden_size or PRESETS[m.preset].hidden_size
            heads = m.num_heads or PRESETS[m.preset].num_heads
            raise ConfigError(
                f"model.hidden_size={hidden} is not divisible by model.num_heads={heads} (model.preset="
                f"{m.preset}); change model.num_heads or model.hidden_size") from None
    folder = Path(m.init_from)
    if not folder.is_dir():
        raise ConfigError(
            f"model.init_from '{folder}' is not a folder; pass a Hugging Face model folder (e.g. a run's "
            f"<output_dir>/warm_start) or leave model.init_from empty for a random init")
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.init_from '{folder}' has no config.json; pass a Hugging Face model folder (e.g. a run's "
            f"<output_dir>/warm_start, written by save_pretrained)")
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        raise ConfigError(
            f"model.init_from '{folder}' has config.json but no weights ({', '.join(_WEIGHT_FILES)}); "
            f"pass a complete Hugging Face model folder (e.g. a run's <output_dir>/warm_start)")
    try:
        raw = json.loads((folder / "config.json").read_text())
        model_vocab = int(raw["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.init_from '{folder}': config.json is unreadable or has no vocab_size "
                          f"({type(e).__name__}); pass a Hugging Face LLaMA model folder") from None
    if raw.get("model_type", "llama") != "llama":
        raise ConfigError(f"model.init_from '{folder}' is a '{raw.get('model_type')}' model; pass a LLaMA "
                          f"(model_type llama) Hugging Face folder")
    if model_vocab != vocab_size:
        tok_dir = cfg.data.tokenizer_dir or "the bundled assets/tokenizer"
        raise ConfigError(
            f"model.init_from '{folder}' has vocab_size {model_vocab} but data.tokenizer_dir ({tok_dir}) has "
            f"{vocab_size}; set data.tokenizer_dir to the tokenizer the model was trained with (an exported "
            f"folder holds it: data.tokenizer_dir={folder})")
    from transformers import LlamaConfig

    try:
        return LlamaConfig.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - transformers raises various errors for bad configs
        raise ConfigError(f"model.init_from '{folder}': config.json does not load as a LlamaConfig "
                          f"({' '.join(str(e).split())[:120]}); pass a Hugging Face LLaMA model folder") from None


def _module_pattern(name: str) -> str:
    """model.layers.3.mlp.up_proj -> model.layers.N.mlp.up_proj (to list names compactly)."""
    return re.sub(r"\.\d+\.", ".N.", name)


def _validate_relora_modules(cfg: Config, model_config) -> None:
    """relora.targets compile and each match an nn.Linear; relora.r fits every targeted layer."""
    import torch
    from transformers import LlamaForCausalLM

    r = cfg.relora
    if not r.targets:
        raise ConfigError("relora.targets is empty; give at least one regex, e.g. "
                          "relora.targets='self_attn\\.(q|k|v|o)_proj$,mlp\\.(gate|up|down)_proj$'")
    compiled = []
    for pat in r.targets:
        try:
            compiled.append(re.compile(pat))
        except re.error as e:
            raise ConfigError(f"relora.targets pattern '{pat}' is not a valid regex ({e}); fix the pattern "
                              f"(re.search over module names, e.g. 'self_attn\\.q_proj$')") from None
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config)
    linears = {n: mod for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    kinds = sorted(set(_module_pattern(n) for n in linears))
    chosen: dict[str, torch.nn.Linear] = {}
    for pat, rx in zip(r.targets, compiled):
        hits = [n for n in linears if rx.search(n)]
        if not hits:
            close = difflib.get_close_matches(pat, kinds, n=1, cutoff=0.3)
            raise ConfigError(
                f"relora.targets pattern '{pat}' matches no nn.Linear module; fix or drop it"
                + (f" (closest: '{close[0]}')" if close else "")
                + f"; Linear names: {', '.join(kinds)}")
        chosen.update((n, linears[n]) for n in hits)
    name, mod = min(chosen.items(), key=lambda kv: (min(kv[1].in_features, kv[1].out_features), kv[0]))
    max_r = min(mod.in_features, mod.out_features)
    if r.r > max_r:
        source = f"model.init_from={cfg.model.init_from}" if cfg.model.init_from else f"model.preset={cfg.model.preset}"
        raise ConfigError(
            f"relora.r={r.r} exceeds min(in, out)={max_r} of the targeted layer '{_module_pattern(name)}' "
            f"({mod.in_features} -> {mod.out_features}; {source}, hidden {model_config.hidden_size}, "
            f"intermediate {model_config.intermediate_size}); use relora.r <= {max_r}")
    problem = check_packs({n: (m.out_features, m.in_features) for n, m in chosen.items()}, r.base_quant)
    if problem:
        raise ConfigError(problem)




def _validate_checkpoint(cfg: Config) -> None:
    """Checkpoint settings, and never train over another run's checkpoints (losing nothing)."""
    from relora_dist.checkpoint import CheckpointError
    from relora_dist.resume import check_output_dir

    ck = cfg.checkpoint
    if ck.save_every < 0 or ck.keep_last < 0:
        raise ConfigError(f"checkpoint.save_every={ck.save_every} and checkpoint.keep_last={ck.keep_last} "
                          f"must be >= 0 (0 = only at the end / keep all)")
    from relora_dist.config import SECTIONS
    from relora_dist.resume import is_structural

    for key in ck.allow_changes:
        section, _, name = key.partition(".")
        if section not in SECTIONS or name not in vars(getattr(cfg, section)):
            known = [f"{s}.{k}" for s in SECTIONS for k in vars(getattr(cfg, s))]
            raise ConfigError(f"checkpoint.allow_changes: unknown key '{key}': {_suggest(key, known)}")
        if is_structural(key):
            raise ConfigError(f"checkpoint.allow_changes: {key} changes the model's tensors and cannot change "
                              f"within a run; drop it (use another run.output_dir for a new run)")
    root = Path(ck.dir) if ck.dir else Path(cfg.run.output_dir) / "checkpoints"
    try:
        check_output_dir(cfg, root)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
