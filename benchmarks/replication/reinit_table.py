#!/usr/bin/env python
"""The cost of a reset per relora.reinit, from the replication table's results (table/results.json)
and the results.json of runs of its relora_gradient / relora_project rows:

    python benchmarks/replication/replicate.py table --rows relora_gradient relora_project
    python benchmarks/replication/reinit_table.py [MORE/results.json ...]   # -> table/reinit.md, reinit.png
    python benchmarks/replication/reinit_table.py --suite tuned --suffix _lr1.6e-2   # -> tuned/reinit.md

Rows run elsewhere (another --out) are merged into table/results.json by seed. Per row and seed:

* per-reset cost: how much the gap to LoRA (mean train loss of a 50-step cycle minus LoRA's, same
  seed, same steps) grows per reset, (gap of the last cycle - gap of the first) / resets: the
  "+0.017 nats per reset" of today's ReLoRA;
* jump vs LoRA: mean over resets of (loss 18-22 steps after the reset - loss over the 5 steps before)
  minus LoRA's change over the same steps;
* first 20 steps vs LoRA: mean over resets of the gap to LoRA over the 20 steps after the reset minus
  the gap over the 20 before it (needs LoRA runs summarized with those windows; "-" otherwise);
* eval perplexity and its ratio to full rank (same seed: the seed also draws the validation split);
* reset wall time from train.log (merge, re-init, prune; the runs share the machine, so these are
  upper bounds, not timings taken alone).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = ("full_rank", "lora", "relora", "relora_gradient", "relora_project")
KEYS = ("eval_ppl", "wall_s", "reset_cost", "cycle_loss", "effective_rank_end", "dirs", "reset_seconds")


def merge(base: dict, extra: dict) -> None:
    """Add `extra`'s rows (and seeds) to `base`, in place; a seed already present is replaced."""
    for name, row in extra["rows"].items():
        row.setdefault("reset_seconds", [reset_seconds(Path(d) if Path(d).is_absolute() else HERE.parents[1] / d)
                                         for d in row["dirs"]])
        if name not in base["rows"]:
            base["rows"][name] = {**row, **{k: [] for k in KEYS + ("seeds",)}}
        into = base["rows"][name]
        seeds = row.get("seeds") or [int(re.search(r"-s(\d+)-", d).group(1)) for d in row["dirs"]]
        into.setdefault("seeds", [int(re.search(r"-s(\d+)-", d).group(1)) for d in into["dirs"]])
        into.setdefault("reset_seconds", [[] for _ in into["dirs"]])
        for i, seed in enumerate(seeds):
            if seed in into["seeds"]:
                j = into["seeds"].index(seed)
                for k in KEYS:
                    into[k][j] = row[k][i]
            else:
                into["seeds"].append(seed)
                for k in KEYS:
                    into[k].append(row[k][i])


def by_seed(row: dict, key: str) -> dict[int, object]:
    seeds = row.get("seeds") or [int(re.search(r"-s(\d+)-", d).group(1)) for d in row["dirs"]]
    return dict(zip(seeds, row[key]))


def reset_seconds(run_dir: Path) -> list[dict[str, float]]:
    """Per reset: merge, re-init and prune seconds as the run's console reported them."""
    log = run_dir / "train.log"
    if not log.exists():
        return []
    pat = r"reset \d+: merge ([\d.]+)s re-init ([\d.]+)s prune ([\d.]+)s"
    return [dict(zip(("merge", "reinit", "prune"), map(float, m))) for m in re.findall(pat, log.read_text())]


def table(results: dict) -> list[str]:
    rows = results["rows"]
    full, lora = by_seed(rows["full_rank"], "eval_ppl"), by_seed(rows["lora"], "cycle_loss")
    lora_jump = {s: [c["loss_after_20"] - c["loss_before"] for c in v] for s, v in by_seed(rows["lora"], "reset_cost").items()}
    lines = ["| row | seeds | eval ppl per seed | ratio to full rank (mean, per seed) | per-reset cost vs LoRA, nats "
             "(mean; per seed) | jump 20 steps after a reset vs LoRA, nats | first 20 steps after a reset vs LoRA, "
             "minus the 20 before, nats | re-init s per reset | reset s per reset |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in [n for n in ROWS if n in rows]:
        row = rows[name]
        ppl = by_seed(row, "eval_ppl")
        ratios = {s: p / full[s] for s, p in ppl.items() if s in full}
        slope, jump, first20 = {}, {}, {}
        if name not in ("lora", "full_rank"):
            for s, cyc in by_seed(row, "cycle_loss").items():
                if s in lora:
                    gaps = [a - b for a, b in zip(cyc, lora[s])]
                    slope[s] = (gaps[-1] - gaps[0]) / (len(gaps) - 1)
            for s, costs in by_seed(row, "reset_cost").items():
                if s in lora_jump:
                    jump[s] = statistics.mean(c["loss_after_20"] - c["loss_before"] - l
                                              for c, l in zip(costs, lora_jump[s]))
                base = by_seed(rows["lora"], "reset_cost").get(s)
                if base and "loss_next_20" in base[0] and "loss_next_20" in costs[0]:
                    first20[s] = statistics.mean((c["loss_next_20"] - b["loss_next_20"]) - (c["loss_prev_20"] - b["loss_prev_20"])
                                                 for c, b in zip(costs, base))
        times = [t for per_seed in row.get("reset_seconds", []) for t in per_seed]
        fmt = lambda d: (f"{statistics.mean(d.values()):+.4f} ({', '.join(f'{v:+.4f}' for _, v in sorted(d.items()))})"  # noqa: E731
                         if d else "-")
        lines.append(
            f"| {name} | {', '.join(map(str, sorted(ppl)))} | {', '.join(f'{ppl[s]:.2f}' for s in sorted(ppl))} | "
            + (f"{statistics.mean(ratios.values()):.3f}x ({', '.join(f'{ratios[s]:.3f}' for s in sorted(ratios))})"
               if ratios else "-") + f" | {fmt(slope)} | {fmt(jump)} | {fmt(first20)} | "
            + (f"{statistics.mean(t['reinit'] for t in times):.3f}" if times else "-") + " | "
            + (f"{statistics.mean(sum(t.values()) for t in times):.3f}" if times else "-") + " |")
    return lines


def _relora_rows(rows: dict) -> list[str]:
    """The re-init rows in ROWS' order, then the suite's other ReLoRA rows with LoRA's cycle windows
    (e.g. tuned's _floor0.5; not relora_no_warm, whose ReLoRA phase starts at step 0)."""
    return [n for n in ROWS if n.startswith("relora")] + [n for n in rows if n.startswith("relora") and n not in ROWS
                                                         and n != "relora_no_warm"]


def cycle_gaps(results: dict) -> list[str]:
    """Seed-mean train loss per cycle minus LoRA's (same seeds), per ReLoRA row."""
    rows = results["rows"]
    lora = by_seed(rows["lora"], "cycle_loss")
    lines = []
    for name in _relora_rows(rows):
        if name in rows:
            gaps = [[a - b for a, b in zip(c, lora[s])] for s, c in by_seed(rows[name], "cycle_loss").items() if s in lora]
            mean = [statistics.mean(g) for g in zip(*gaps)]
            if not lines:
                lines = ["| row | " + " | ".join(f"cycle {i + 1}" for i in range(len(mean))) + " |",
                         "|---|" + "---|" * len(mean)]
            lines.append(f"| {name} | " + " | ".join(f"{g:+.3f}" for g in mean) + " |")
    return lines


def plot(results: dict, out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    lora = by_seed(rows["lora"], "cycle_loss")
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in _relora_rows(rows):
        if name not in rows:
            continue
        gaps = [[a - b for a, b in zip(c, lora[s])] for s, c in by_seed(rows[name], "cycle_loss").items() if s in lora]
        mean = [statistics.mean(g) for g in zip(*gaps)]
        ax.plot(range(1, len(mean) + 1), mean, marker="o", label=f"{name} ({len(gaps)} seeds)")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("cycle of the ReLoRA phase (a reset between cycles)")
    ax.set_ylabel("train loss minus LoRA's (nats, seed mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reinit.png", dpi=110)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("extra", nargs="*", help="results.json of more runs of the suite's rows, merged in by seed")
    ap.add_argument("--suite", default="table", help="the suite folder to read and write (default: table)")
    ap.add_argument("--suffix", default="", help="a suffix of the suite's row names to drop, so that its rows "
                    "read as full_rank / lora / relora / ... (tuned: _lr1.6e-2)")
    args = ap.parse_args(argv)
    out = HERE / args.suite
    results = json.loads((out / "results.json").read_text())
    if args.extra:
        for extra in args.extra:
            merge(results, json.loads(Path(extra).read_text()))
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    results["rows"] = {n.removesuffix(args.suffix): r for n, r in results["rows"].items()}
    for row in results["rows"].values():  # a suite's own rows: reset timings from their train.log
        row.setdefault("reset_seconds", [reset_seconds(Path(d) if Path(d).is_absolute() else HERE.parents[1] / d)
                                         for d in row["dirs"]])
    lines = table(results) + ["", "Train loss per cycle minus LoRA's (seed means):", ""] + cycle_gaps(results)
    (out / "reinit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
