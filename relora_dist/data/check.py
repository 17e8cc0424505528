"""The data rules of a run config, named by config key: the tokenizer folder, the sources, and
prepared data against data.seq_len, the tokenizer and the batch sizes. Each rule is the one the
pipeline applies when it reads the data (tokenizer.py, documents.py, blocks.py, loader.py, all in data/); only the
wording differs, so a bad input fails here, before any work, with the same rule.
"""
from __future__ import annotations

from relora_dist.config import ConfigError
from relora_dist.data.blocks import (DataError, Wording, check_blocks, check_seq_len, check_tokenizer_matches,
                                     read_meta)
from relora_dist.data.loader import check_eval_blocks, check_train_blocks, eval_fix
from relora_dist.data.documents import check_sources
from relora_dist.resources import CORPUS, TOKENIZER
from relora_dist.data.tokenizer import has_tokenizer, load_tokenizer

__all__ = ["PREPARE_HINT", "check_data_values", "check_data_config", "tokenizer_dir_of"]

PREPARE_HINT = "run tools/prepare_data.py --input FILES --out {dir} --seq_len {seq_len}"


def tokenizer_dir_of(cfg) -> str:
    """The run's tokenizer folder: data.tokenizer_dir; unset, the model.init_from folder's own
    tokenizer when it holds one (a model continues with the tokenizer it was trained with), else
    the bundled one."""
    if cfg.data.tokenizer_dir:
        return cfg.data.tokenizer_dir
    if cfg.model.init_from and has_tokenizer(cfg.model.init_from):
        return cfg.model.init_from
    return str(TOKENIZER)


def check_data_values(cfg) -> None:
    """data.seq_len (the block rule prepare_dataset applies) and data.val_fraction: a run evaluates,
    so it needs a validation split (prepare_dataset itself also accepts 0)."""
    try:
        check_seq_len(cfg.data.seq_len, "data.seq_len")
    except DataError as e:
        raise ConfigError(str(e)) from None
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
    if not cfg.data.prepare_timeout_s > 0:
        raise ConfigError(f"data.prepare_timeout_s={cfg.data.prepare_timeout_s} must be > 0 seconds")


def check_data_config(cfg) -> int:
    """Raise ConfigError unless the run's data can be read as configured; returns the tokenizer's
    vocabulary size (the model's)."""
    try:
        return _check(cfg)
    except (DataError, OSError, ValueError) as e:  # tokenizer: FileNotFoundError / ValueError
        raise ConfigError(str(e)) from None


def _check(cfg) -> int:
    d, t = cfg.data, cfg.train
    tok_dir = tokenizer_dir_of(cfg)
    vocab_size = load_tokenizer(tok_dir, "data.tokenizer_dir").vocab_size
    if not d.prepared_dir:
        check_sources(d.sources or [CORPUS], "data.sources file", refuse_empty=True)
        return vocab_size
    pdir = d.prepared_dir
    hint = PREPARE_HINT.format(dir=pdir, seq_len=d.seq_len) + f" --tokenizer {tok_dir}"
    w = Wording(dir="data.prepared_dir", seq_len="data.seq_len", tokenizer="data.tokenizer_dir",
                model=f"data.tokenizer_dir '{tok_dir}'", hint=hint, reprepare=PREPARE_HINT)
    meta = read_meta(pdir, Wording(dir=w.dir, hint=hint + " (or set data.prepared_dir='' to prepare data.sources "
                                                          "on first use)"))
    for split in ("train", "val"):
        check_blocks(pdir, meta, split, d.seq_len, w)
    check_tokenizer_matches(pdir, vocab_size, tok_dir, w)
    per_block = meta["seq_len"] // d.seq_len
    what = f"data.prepared_dir '{pdir}'"
    check_train_blocks(int(meta["num_blocks"]["train"]) * per_block, t.global_batch_size, what,
                       f"train.global_batch_size={t.global_batch_size} sequences of data.seq_len={d.seq_len}",
                       "lower train.global_batch_size or prepare more data")
    check_eval_blocks(int(meta["num_blocks"]["val"]) * per_block, t.micro_batch_size, 1, None, what,
                      eval_fix(meta, f"lower train.micro_batch_size={t.micro_batch_size} or re-prepare with a "
                                     f"larger --val_fraction"))
    return vocab_size
