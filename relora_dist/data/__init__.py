"""Data pipeline: documents -> token ids -> packed fixed-length blocks -> per-rank batches.

    prepare.py  load documents, tokenize, split train/val, pack to disk; the prepare-on-first-use cache
    blocks.py   the prepared format: meta.json checks and the memory-mapped block view
    loader.py   deterministic, resumable, rank-sharded training batches; evaluation batches

Everything public is importable from ``relora_dist.data``.
"""
from relora_dist.data.blocks import (FORMAT_VERSION, SPLITS, DataError, PackedBlocks,
                                     check_tokenizer_matches, read_meta)
from relora_dist.data.loader import BlockLoader, DistributedBlockSampler, eval_batches
from relora_dist.data.prepare import (DEFAULT_CORPUS, DEFAULT_TOKENIZER, _builder_for,  # noqa: F401
                                      ensure_prepared, load_documents, prepare_dataset)

# _builder_for is re-exported for relora_dist.validation, which checks source suffixes with it.
__all__ = [
    "DataError", "DEFAULT_CORPUS", "DEFAULT_TOKENIZER", "FORMAT_VERSION", "SPLITS",
    "load_documents", "prepare_dataset", "ensure_prepared", "read_meta",
    "PackedBlocks", "BlockLoader", "DistributedBlockSampler", "eval_batches",
    "check_tokenizer_matches",
]
