"""Data pipeline: documents -> token ids -> packed fixed-length blocks -> per-rank batches.

    ../documents.py  load documents from files (no tokenizer: tokenizer training reads them too)
    stream.py        the inputs as a stream of units, tokenized on a pool of processes
    shards.py        token shards: the resumable writer and the view that reads blocks across them
    prepare.py       tokenize, split train/val, pack to disk
    first_use.py     the prepare-on-first-use cache, shared by a launch's ranks without a collective
    blocks.py        the prepared format: meta.json checks and the memory-mapped block view
    loader.py        deterministic, resumable, rank-sharded training batches; evaluation batches
    check.py         the same rules applied to a run config before any work (named by config key)

Everything public is importable from ``relora_dist.data``. The names are imported on first use: the
preparation's worker processes import relora_dist.data.stream, which needs neither torch nor the
modules that do (importing torch costs each worker ~220 MB and ~2 s, measured).
"""
from __future__ import annotations

import importlib

_WHERE = {
    "relora_dist.data.blocks": ("FORMAT_VERSION", "SPLITS", "DataError", "PackedBlocks", "check_tokenizer_matches",
                                "read_meta"),
    "relora_dist.data.check": ("PREPARE_HINT", "check_data_config", "tokenizer_dir_of"),
    "relora_dist.data.loader": ("BlockLoader", "eval_batches"),
    "relora_dist.data.first_use": ("ensure_prepared",),
    "relora_dist.data.prepare": ("DEFAULT_CORPUS", "DEFAULT_TOKENIZER", "prepare_dataset"),
    "relora_dist.data.documents": ("load_documents",),
}
_MODULE = {name: module for module, names in _WHERE.items() for name in names}

__all__ = [
    "DataError", "DEFAULT_CORPUS", "DEFAULT_TOKENIZER", "FORMAT_VERSION", "SPLITS", "PREPARE_HINT",
    "load_documents", "prepare_dataset", "ensure_prepared", "read_meta",
    "PackedBlocks", "BlockLoader", "eval_batches",
    "check_tokenizer_matches", "check_data_config", "tokenizer_dir_of",
]


def __getattr__(name: str):
    if name not in _MODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
