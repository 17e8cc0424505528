"""Data pipeline: documents -> token ids -> packed fixed-length blocks -> per-rank batches.

    ../documents.py  load documents from files (no tokenizer: tokenizer training reads them too)
    prepare.py       tokenize, split train/val, pack to disk
    first_use.py     the prepare-on-first-use cache, shared by a launch's ranks without a collective
    blocks.py        the prepared format: meta.json checks and the memory-mapped block view
    loader.py        deterministic, resumable, rank-sharded training batches; evaluation batches
    check.py         the same rules applied to a run config before any work (named by config key)

Everything public is importable from ``relora_dist.data``.
"""
from relora_dist.data.blocks import (FORMAT_VERSION, SPLITS, DataError, PackedBlocks,
                                     check_tokenizer_matches, read_meta)
from relora_dist.data.check import PREPARE_HINT, check_data_config, tokenizer_dir_of
from relora_dist.data.loader import BlockLoader, DistributedBlockSampler, eval_batches
from relora_dist.data.first_use import ensure_prepared
from relora_dist.data.prepare import DEFAULT_CORPUS, DEFAULT_TOKENIZER, prepare_dataset
from relora_dist.documents import load_documents

__all__ = [
    "DataError", "DEFAULT_CORPUS", "DEFAULT_TOKENIZER", "FORMAT_VERSION", "SPLITS", "PREPARE_HINT",
    "load_documents", "prepare_dataset", "ensure_prepared", "read_meta",
    "PackedBlocks", "BlockLoader", "DistributedBlockSampler", "eval_batches",
    "check_tokenizer_matches", "check_data_config", "tokenizer_dir_of",
]
