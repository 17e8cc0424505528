"""Print a checkpoint's manifest summary: step, phase, restart index, cumulative rank, sizes.

    relora-inspect runs/default/checkpoints      # its latest checkpoint
    relora-inspect runs/default/checkpoints/step_00000300 --verify
    python tools/inspect_ckpt.py runs/default/checkpoints     # same, from a checkout
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from relora_dist.checkpoint.format import (MANIFEST, OLDER, CheckpointError, ShardReader, check_tokenizer, find_latest,
                                   read_manifest, shard_path)


def summary(ckpt_dir: Path, verify: bool) -> str:
    if not (ckpt_dir / MANIFEST).is_file():
        latest = find_latest(ckpt_dir)
        if latest is None:
            raise CheckpointError(f"{ckpt_dir} holds no {MANIFEST} and no checkpoints: pass a step_* directory")
        ckpt_dir = latest
    m = ShardReader(ckpt_dir).manifest if verify else read_manifest(ckpt_dir)
    if verify:
        check_tokenizer(ckpt_dir)
    missing = [f["file"] for f in m["files"] if not shard_path(ckpt_dir, f).is_file()]
    if missing:
        raise CheckpointError(f"{ckpt_dir / missing[0]} is missing ({len(missing)} of {len(m['files'])} shards): "
                              f"the checkpoint is incomplete; {OLDER.format(root=ckpt_dir.parent)}")
    numel = sum(math.prod(t["shape"]) for t in m["tensors"].values())
    trainable = sum(math.prod(t["shape"]) for t in m["tensors"].values() if t.get("trainable"))
    size = sum((ckpt_dir / f["file"]).stat().st_size for f in m["files"])
    cum = m.get("cumulative_rank") or {"total": 0, "per_module": {}}
    lines = [
        f"checkpoint     {ckpt_dir}",
        f"format         v{m['format_version']}",
        f"step           {m['global_step']}  (tokens seen {m['tokens_seen']:,})",
        f"phase          {m['phase']}",
        f"restart index  {m['restart_index']}",
        f"cumulative rank total {cum['total']} over {len(cum['per_module'])} modules"
        + (f" (per module {min(cum['per_module'].values())}..{max(cum['per_module'].values())})" if cum["per_module"] else ""),
        f"relora         r={m['relora']['r']} alpha={m['relora']['alpha']} targets={m['relora']['targets']}",
        f"saved on       world size {m['world_size']}, "
        f"{'FSDP2' if m.get('backend') == 'fsdp2' else 'ZeRO-%d' % m['zero_stage']}, {m.get('precision', '?')}",
        f"params         {numel:,} ({trainable:,} trainable)",
        f"files          {len(m['files'])} shards, {size / 2**20:.1f} MiB" + (", sha256 verified" if verify else ""),
        f"data loader    {m['data_loader']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt_dir", help="a checkpoint (step_*/) or a checkpoints/ folder (its latest is used); required")
    ap.add_argument("--verify", action="store_true", help="also check every shard's sha256 (default: off)")
    args = ap.parse_args(argv)
    try:
        print(summary(Path(args.ckpt_dir), args.verify))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

