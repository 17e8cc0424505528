"""What a checkpoint may point at and hold, checked by every reader (resume, relora-inspect,
relora-convert): each function returns a problem (a phrase for a one-line error) or None.

A checkpoint is read from disk that others can write to, so a reader takes nothing on trust that
could lead it outside the checkpoint folder or into running code: shard names are exactly the
writer's own (`rank00000.safetensors`), regular files inside the folder, never links; `latest`
names a sibling `step_*` folder; the manifest carries a sha256 of its own content; the model
config handed to transformers holds only LLaMA architecture fields (an `auto_map` would make an
export run code under trust_remote_code).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from relora_dist.data.tokenizer import TOKENIZER_FILES, tokenizer_files

CHECKSUM = "manifest_sha256"
OLDER = ("resume an older one with --checkpoint.resume=previous (the newest that verifies) or "
         "--checkpoint.resume={root}/step_N")
_SHARD = re.compile(r"rank(\d{5})\.safetensors\Z")
_STEP = re.compile(r"step_\d+\Z")

# The LlamaConfig fields that describe the architecture (what the writer records through
# LlamaConfig.to_dict(), less bookkeeping); rope_theta/rope_scaling are older transformers' names.
MODEL_CONFIG_KEYS = frozenset((
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "pretraining_tp", "tie_word_embeddings",
    "rope_parameters", "rope_theta", "rope_scaling", "attention_bias", "attention_dropout", "mlp_bias",
    "head_dim", "model_type", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types"))


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a rename is durable once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointError(ValueError):
    """A one-line problem with a checkpoint that names the file and the fix."""


def shard_name(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def shard_problem(ckpt_dir: Path, entry: dict) -> str | None:
    """Why a manifest `files` entry cannot be read as this checkpoint's own shard (None: it can,
    or the file is merely missing, which the caller reports as an incomplete checkpoint)."""
    name, rank = entry.get("file"), entry.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0 or name != shard_name(rank):
        return f"names shard {name!r} for rank {rank!r}, not the writer's own rank%05d.safetensors name"
    path = ckpt_dir / name
    if path.is_symlink():
        return f"has shard {name} as a symbolic link; a checkpoint holds its shards as regular files"
    if path.exists() and not path.is_file():
        return f"has shard {name} that is not a regular file"
    return None


def latest_problem(name: str) -> str | None:
    if not _STEP.match(name):
        return f"names {name!r}, not a step_* folder beside it"
    return None


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != CHECKSUM}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def manifest_digest(manifest: dict) -> str:
    """sha256 over the manifest's content without its own checksum field, key order independent."""
    return hashlib.sha256(_canonical(manifest)).hexdigest()


def with_checksum(manifest: dict) -> dict:
    """The manifest as a reader will parse it (JSON round trip), with its checksum added."""
    parsed = json.loads(json.dumps(manifest, default=str))
    parsed[CHECKSUM] = manifest_digest(parsed)
    return parsed


def checksum_problem(manifest: dict, version: int) -> str | None:
    """From format 2 on the manifest must carry its checksum; format 1 (written before) has none."""
    saved = manifest.get(CHECKSUM)
    if saved is None:
        return f"lacks {CHECKSUM} (format_version {version} records one)" if version >= 2 else None
    if saved != manifest_digest(manifest):
        return "fails its sha256 check (edited or corrupted)"
    return None


def tokenizer_problem(tok_dir: Path) -> str | None:
    """Why a checkpoint's tokenizer/ cannot be exported (missing, a link, no tokenizer file, or a
    tokenizer file that is a link)."""
    if tok_dir.is_symlink() or not tok_dir.is_dir():
        return f"{tok_dir} is {'a symbolic link' if tok_dir.is_symlink() else 'missing'}; a checkpoint holds " \
               f"its tokenizer files in a tokenizer/ folder"
    links = [n for n in TOKENIZER_FILES if (tok_dir / n).is_symlink()]
    if links:
        return f"{tok_dir / links[0]} is a symbolic link; a checkpoint holds its tokenizer as regular files"
    if not tokenizer_files(tok_dir):
        return f"{tok_dir} holds none of the tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)"
    return None


def architecture(model_config: dict) -> dict:
    """Only the LLaMA architecture fields of a manifest's model_config (auto_map and anything
    unknown are dropped)."""
    return {k: v for k, v in model_config.items() if k in MODEL_CONFIG_KEYS}


def shard_path(ckpt_dir: Path, entry: dict) -> Path:
    """The file of a manifest `files` entry: only the writer's own shard name, inside `ckpt_dir`,
    never a link (a damaged or crafted manifest must not make a reader open files elsewhere)."""
    problem = shard_problem(ckpt_dir, entry)
    if problem:
        raise CheckpointError(f"{ckpt_dir / 'manifest.json'} {problem}: the checkpoint is damaged or was altered; "
                              f"{OLDER.format(root=ckpt_dir.parent)}")
    return ckpt_dir / entry["file"]


def check_tokenizer(ckpt_dir: Path) -> None:
    """A checkpoint converts on its own only with its tokenizer/ folder (regular files)."""
    problem = tokenizer_problem(ckpt_dir / "tokenizer")
    if problem:
        raise CheckpointError(f"{problem}: the checkpoint cannot be exported; {OLDER.format(root=ckpt_dir.parent)}")
