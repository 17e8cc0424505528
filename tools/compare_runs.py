#!/usr/bin/env python
"""Compare runs from their TensorBoard logs: a Markdown table and PNG plots.

    python tools/compare_runs.py --runs full=runs/rep/full relora=runs/rep/relora --out benchmarks/replication

Writes OUT/table.md (final eval perplexity per run, ratio to the first run, tokens, trainable
params, resets) and OUT/loss.png (train loss against tokens, reset markers) and OUT/ppl.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def load_run(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])

    def series(tag):
        return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in tags else []

    if "train/loss" not in tags:
        raise SystemExit(f"error: {run_dir / 'tb'} has no train/loss scalars; pass a run's output_dir")
    tokens = dict(series("train/tokens_seen"))
    loss = series("train/loss")
    return {
        "tokens": [tokens.get(s, 0.0) for s, _ in loss], "loss": [v for _, v in loss],
        "eval_ppl": series("eval/ppl"), "resets": [s for s, _ in series("relora/reset_total_s")],
        "tokens_by_step": tokens, "switch": [s for s, _ in series("mem/frozen_master_mb")],
        "loss_steps": [s for s, _ in loss], "effective_rank": series("relora/effective_rank_mean"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="NAME=RUN_DIR pairs; the first is the reference")
    ap.add_argument("--out", required=True, help="output folder for table.md, loss.png, ppl.png")
    ap.add_argument("--title", default="", help="plot title (default: none)")
    args = ap.parse_args(argv)
    runs = {}
    for item in args.runs:
        if "=" not in item:
            print(f"error: '{item}' is not NAME=RUN_DIR", file=sys.stderr)
            return 2
        name, path = item.split("=", 1)
        runs[name] = load_run(Path(path))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref_name = next(iter(runs))
    ref_ppl = runs[ref_name]["eval_ppl"][-1][1]
    lines = [f"| run | final eval ppl | vs {ref_name} | tokens | resets |", "|---|---|---|---|---|"]
    for name, r in runs.items():
        ppl = r["eval_ppl"][-1][1]
        lines.append(f"| {name} | {ppl:.2f} | {ppl / ref_ppl:.3f}x | {int(r['tokens'][-1]):,} | {len(r['resets'])} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in runs.items():
        (line,) = ax.plot(r["tokens"], r["loss"], label=name, linewidth=1)
        for step in r["resets"]:
            ax.axvline(r["tokens_by_step"].get(step, 0), color=line.get_color(), alpha=0.25, linestyle=":")
    ax.set_xlabel("tokens")
    ax.set_ylabel("train loss")
    ax.set_ylim(top=min(8.0, max(max(r["loss"]) for r in runs.values())))
    ax.legend()
    ax.set_title(args.title or "train loss (dotted: ReLoRA resets)")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(runs)
    ax.bar(names, [runs[n]["eval_ppl"][-1][1] for n in names])
    ax.set_ylabel("final eval perplexity")
    fig.tight_layout()
    fig.savefig(out / "ppl.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
