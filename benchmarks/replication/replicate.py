#!/usr/bin/env python
"""ReLoRA against LoRA and full-rank training where the wrapped linears hold most parameters.

    python benchmarks/replication/replicate.py table       # the paper's Table 2 rows x 3 seeds
    python benchmarks/replication/replicate.py sweep       # rank, cycle length / number of resets
    python benchmarks/replication/replicate.py ablations   # schedule, carried moments, merge precision, pruning
    python benchmarks/replication/replicate.py long        # >= 10 tokens per wrapped parameter, 3 seeds
    python benchmarks/replication/replicate.py lr          # the ReLoRA phase's peak LR, seed 0
    python benchmarks/replication/replicate.py tuned       # the table at the adapters' best LR, 3 seeds
    python benchmarks/replication/replicate.py long5       # long's ReLoRA/LoRA pairs at that LR, 5 seeds

Every row trains the same model on the same tokens (MODEL and COMMON below) with one process on
the CPU, one row after another: two trainings at once on 2 cores oversubscribe the OpenMP threads
and run 5-8x slower. Runs are keyed by their exact overrides, so a run shared by two suites (the
table's seed-0 ReLoRA is the sweep's r=8 point) trains once, and an interrupted suite resumes
where it stopped. Each suite writes OUT/SUITE/{results.json, table.md, loss.png, ppl.png}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from compare_runs import load_run  # noqa: E402  (the TensorBoard reader the other tables use)

VOCAB = 4096
HIDDEN = 256
# hidden 256, 4 layers, 4k vocabulary: the wrapped linears are 3.16M of 5.26M parameters (60%), so
# the low-rank part is most of the model, unlike the tiny preset (2.05M of ReLoRA's 2.2M trainable
# parameters there are embeddings and head).
MODEL = ["--model.preset=tiny", f"--model.hidden_size={HIDDEN}", "--model.intermediate_size=688",
         "--model.num_layers=4", "--model.num_heads=4"]
STEPS = 400
# 400 steps x 16 x 128 tokens = 819,200 tokens per row; a row takes ~3.3 min on 2 quiet cores.
COMMON = ["--data.seq_len=128", f"--train.max_steps={STEPS}", "--train.global_batch_size=16",
          "--train.micro_batch_size=16", "--train.eval_every=100", "--train.eval_tokens=65536",
          "--optimizer.lr=2e-3", "--schedule.warmup_steps=30", "--logging.progress_bar=false",
          "--logging.log_every=100", "--checkpoint.resume=", "--checkpoint.overwrite=true",
          "--run.export_warm_start=false"]
# ReLoRA as in the paper, scaled to 400 steps: warm start 1/4 of the run, a reset every 50 steps
# (5 resets), jagged restart warmup, magnitude pruning of the adapters' moments.
RELORA = ["--relora.r=8", "--relora.alpha=8", "--relora.warm_start_steps=100", "--relora.cycle_length=50",
          "--relora.first_warmup=10", "--relora.restart_warmup=10", "--relora.optimizer_reset=magnitude",
          "--relora.prune_ratio=0.9", "--relora.effective_rank_every=50"]
FULL = ["--relora.enabled=false"]
LORA = RELORA + ["--relora.resets=false"]
NO_WARM = RELORA + ["--relora.warm_start_steps=0"]
# The paper's control: full-rank training of a smaller model with about ReLoRA's trainable count
# (ReLoRA r=8 trains 2,255,616; hidden 128 with 6 layers has 2,236,032).
CONTROL = FULL + ["--model.hidden_size=128", "--model.intermediate_size=344", "--model.num_layers=6"]


def with_(base: list[str], **kv) -> list[str]:
    """base with --relora.KEY=VALUE style overrides replaced (keys use '__' for '.')."""
    out = list(base)
    for key, value in kv.items():
        flag = "--" + key.replace("__", ".") + "="
        out = [a for a in out if not a.startswith(flag)] + [f"{flag}{value}"]
    return out


# The paper's regime at a size 2 cores train in minutes (`long`): the wrapped linears see >= 10
# tokens per parameter, as the paper's rows see ~19 per parameter (350m: 6.8B tokens). Hidden 64,
# intermediate 172, 4 layers: 197,632 wrapped parameters; 1,000 steps x 2,048 tokens = 2.05M tokens,
# 10.4 per wrapped parameter (2.1 epochs of the 0.97M-token training split). r / hidden = 1/8 as the
# paper's 350m (r 128, hidden 1024); a full-rank warm start of a quarter of the run and a reset
# every quarter (2 resets), as its 350m recipe (5K warm start, a reset every 5K, 20K steps).
LONG_STEPS = 1000
LONG = ["--model.hidden_size=64", "--model.intermediate_size=172", f"--train.max_steps={LONG_STEPS}",
        "--train.eval_every=250"]
LONG_RELORA = LONG + with_(RELORA, relora__warm_start_steps=250, relora__cycle_length=250,
                           relora__effective_rank_every=250)

SUITES: dict[str, dict] = {
    "long": {"seeds": [0, 1, 2], "rows": {
        "full_rank": LONG + FULL, "relora": LONG_RELORA, "lora": LONG_RELORA + ["--relora.resets=false"],
        "relora_gradient": with_(LONG_RELORA, relora__reinit="gradient"),
        # r / hidden = 1/32 as the table's, where LoRA's rank binds harder
        "relora_r2": with_(LONG_RELORA, relora__r=2, relora__alpha=2),
        "lora_r2": with_(LONG_RELORA, relora__r=2, relora__alpha=2) + ["--relora.resets=false"],
        # the same at the adapters' better LR (the `lr` suite: 4x the table's ReLoRA-phase LR)
        "relora_r2_lr1.6e-2": with_(LONG_RELORA, relora__r=2, relora__alpha=2, relora__lr="1.6e-2"),
        "lora_r2_lr1.6e-2": with_(LONG_RELORA, relora__r=2, relora__alpha=2, relora__lr="1.6e-2")
        + ["--relora.resets=false"],
        # the same two re-initialisations, and twice as many resets (rank 12 against LoRA's 2)
        "relora_gradient_r2_lr1.6e-2": with_(LONG_RELORA, relora__r=2, relora__alpha=2, relora__lr="1.6e-2",
                                             relora__reinit="gradient"),
        "relora_r2_lr1.6e-2_cycle125": with_(LONG_RELORA, relora__r=2, relora__alpha=2, relora__lr="1.6e-2",
                                             relora__cycle_length=125, relora__effective_rank_every=125),
        # r / hidden = 1/64: LoRA's rank binds hardest (rank 1 against ReLoRA's 3)
        "relora_r1_lr1.6e-2": with_(LONG_RELORA, relora__r=1, relora__alpha=1, relora__lr="1.6e-2"),
        "lora_r1_lr1.6e-2": with_(LONG_RELORA, relora__r=1, relora__alpha=1, relora__lr="1.6e-2")
        + ["--relora.resets=false"],
        # no reset once the LR is below half its peak (relora.min_reset_lr_ratio): the reset at 750 goes
        "relora_r1_lr1.6e-2_floor0.5": with_(LONG_RELORA, relora__r=1, relora__alpha=1, relora__lr="1.6e-2",
                                             relora__min_reset_lr_ratio="0.5")}},
    # the long run's ReLoRA-against-LoRA pairs at the adapters' LR on five seeds (seeds 0-2 are long's runs)
    "long5": {"seeds": [0, 1, 2, 3, 4], "rows": {}},  # filled below from long's rows
    "table": {"seeds": [0, 1, 2], "rows": {
        "full_rank": FULL, "relora": RELORA, "lora": LORA, "relora_no_warm": NO_WARM, "control": CONTROL,
        # relora.reinit: A from the gradient at each reset; and with B's moments projected, not pruned
        "relora_gradient": with_(RELORA, relora__reinit="gradient"),
        "relora_project": with_(RELORA, relora__reinit="project")}},
    # relora.lr, the peak LR of the ReLoRA phase (LoRA's too): the table's 4e-3 is 2x full rank's
    # (the reference's advice); here swept on seed 0 for each adapter row, and full rank at 2x its LR.
    "lr": {"seeds": [0], "rows": {
        "full_rank": FULL, "full_rank_lr1e-3": with_(FULL, optimizer__lr="1e-3"),
        "full_rank_lr4e-3": with_(FULL, optimizer__lr="4e-3"),
        **{f"{name}{'_lr' + lr if lr else ''}": with_(base, relora__lr=lr) if lr else base
           for name, base, lrs in (("lora", LORA, ("8e-3", "1.6e-2", "3.2e-2")),
                                   ("relora", RELORA, ("8e-3", "1.6e-2", "3.2e-2")),
                                   ("relora_gradient", with_(RELORA, relora__reinit="gradient"),
                                    ("8e-3", "1.6e-2", "3.2e-2")))
           for lr in (None, *lrs)},
        # the reference's schedule (a fresh cosine over the ReLoRA phase: a higher LR at the late resets)
        **{f"{name}_lr1.6e-2_reference": with_(base, relora__lr="1.6e-2", relora__warm_start_schedule="reference")
           for name, base in (("lora", LORA), ("relora_gradient", with_(RELORA, relora__reinit="gradient")))}}},
    # the table at the adapters' best LR of the `lr` suite (4x the table's relora.lr), 3 seeds
    "tuned": {"seeds": [0, 1, 2], "rows": {
        "full_rank": FULL,
        **{f"{name}_lr1.6e-2": with_(base, relora__lr="1.6e-2") for name, base in
           (("lora", LORA), ("relora", RELORA), ("relora_gradient", with_(RELORA, relora__reinit="gradient")))},
        # resets only while the LR is at least half its peak (relora.min_reset_lr_ratio): 150 and 200
        **{f"{name}_lr1.6e-2_floor0.5": with_(base, relora__lr="1.6e-2", relora__min_reset_lr_ratio="0.5")
           for name, base in (("relora", RELORA), ("relora_gradient", with_(RELORA, relora__reinit="gradient")))}}},
    "sweep": {"seeds": [0], "rows": {
        **{f"relora_r{r}": with_(RELORA, relora__r=r, relora__alpha=r) for r in (8, 16, 32)},
        **{f"lora_r{r}": with_(LORA, relora__r=r, relora__alpha=r) for r in (8, 16, 32)},
        "relora_r8_cycle25": with_(RELORA, relora__cycle_length=25, relora__restart_warmup=5),
        "relora_r8_cycle100": with_(RELORA, relora__cycle_length=100),
        "relora_r8_cycle150": with_(RELORA, relora__cycle_length=150)}},
    "ablations": {"seeds": [0], "rows": {
        "relora": RELORA,
        "lora": LORA,
        "lora_lr_restarts": with_(LORA, relora__lr_restarts="true"),
        "schedule_anneal": with_(RELORA, relora__warm_start_schedule="anneal"),
        "carry_false": with_(RELORA, relora__carry_optimizer_state="false"),
        "prune_0": with_(RELORA, relora__prune_ratio=0.0),
        "prune_0.99": with_(RELORA, relora__prune_ratio=0.99),
        "bf16_merge_fp32": with_(RELORA, train__precision="bf16", relora__merge_precision="fp32"),
        "bf16_merge_bf16": with_(RELORA, train__precision="bf16", relora__merge_precision="bf16"),
        # the frozen base held in 4 / 8 bits from the switch on, requantized from fp32 masters
        "nf4_base": with_(RELORA, relora__base_quant="nf4"),
        "int8_base": with_(RELORA, relora__base_quant="int8")}},
}
SUITES["long5"]["rows"] = {n: SUITES["long"]["rows"][n] for n in (
    "full_rank", "relora_r1_lr1.6e-2", "lora_r1_lr1.6e-2", "relora_r2_lr1.6e-2", "lora_r2_lr1.6e-2")}


def run_key(args: list[str], seed: int) -> str:
    return hashlib.sha256(json.dumps([MODEL, COMMON, sorted(args), seed]).encode()).hexdigest()[:12]


def ensure_tokenizer(runs_dir: Path) -> Path:
    tok = runs_dir / f"tokenizer_{VOCAB}"
    if not (tok / "tokenizer.model").exists():
        subprocess.run([sys.executable, str(ROOT / "tools/train_tokenizer.py"), "--out", str(tok),
                        "--vocab_size", str(VOCAB)], check=True)
    return tok


def train(name: str, args: list[str], seed: int, runs_dir: Path, tok: Path) -> dict:
    key = run_key(args, seed)
    out = runs_dir / f"{name}-s{seed}-{key}"
    # the same run under another row's name (the sweep's r=8 point is the table's ReLoRA row)
    trained = sorted(runs_dir.glob(f"*-s{seed}-{key}/replicate_run.json"))
    done = out / "replicate_run.json" if not trained else trained[0]
    out = done.parent
    if done.exists():
        record = json.loads(done.read_text())
        return {**record, **summarize(load_run(out), args)}
    cmd = [sys.executable, str(ROOT / "launchers/pretrain.py"), *MODEL, *COMMON, *args,
           f"--data.tokenizer_dir={tok}", f"--train.seed={seed}", f"--run.output_dir={out}"]
    print(f"== {name} seed {seed}: {out}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / "train.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"error: {name} seed {seed} failed (rc {proc.returncode}); see {out / 'train.log'}")
    trainable = [int(x.replace(",", "")) for x in re.findall(r"trainable params ([\d,]+)", proc.stdout)]
    record = {"seed": seed, "wall_s": round(wall, 1), "trainable_params_last": trainable[-1] if trainable else None,
              "dir": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out)}
    done.write_text(json.dumps(record, indent=1))
    record.update(summarize(load_run(out), args))
    print(f"   eval ppl {record['eval_ppl']:.2f} in {wall:.0f} s", flush=True)
    return record


def _arg(args: list[str], key: str, default: int) -> int:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{key}=")]
    return int(values[-1]) if values else default


def summarize(r: dict, args: list[str]) -> dict:
    """Final eval ppl, and what the loss does across each cycle boundary of the row's ReLoRA
    schedule (a reset in ReLoRA rows; the same steps in rows without resets, which is the
    baseline a reset's cost is read against): mean train loss over the 5 steps before the
    boundary against the 5 steps around 20 steps after it (one step's loss is noisy at 2k tokens)."""
    loss_by_step = dict(zip(r["loss_steps"], r["loss"]))

    def mean_loss(lo, hi):
        vals = [loss_by_step[s] for s in range(lo, hi) if s in loss_by_step]
        return sum(vals) / len(vals) if vals else float("nan")

    warm, cycle = _arg(args, "relora.warm_start_steps", 100), _arg(args, "relora.cycle_length", 50)
    steps = _arg(args, "train.max_steps", STEPS)
    # the reset after the step at phase index k*cycle is logged with the next step's number
    bounds = range(max(warm, 1) + cycle + 1, steps - 20, cycle)
    # loss_prev_20 / loss_next_20: the 20 steps up to the reset (record s is the step at LR 0, taken
    # before it) and the 20 after it, for the per-reset cost against LoRA (reinit_table.py)
    changes = [{"step": s, "loss_before": mean_loss(s - 5, s), "loss_after_20": mean_loss(s + 18, s + 23),
                "loss_prev_20": mean_loss(s - 19, s + 1), "loss_next_20": mean_loss(s + 1, s + 21)}
               for s in bounds]
    cycles = [round(mean_loss(b, b + cycle), 4) for b in range(warm + 1, steps + 1, cycle)]
    return {"eval_ppl": r["eval_ppl"][-1][1], "eval_curve": r["eval_ppl"], "tokens": int(r["tokens"][-1]),
            "cycle_loss": cycles,
            "resets": len(r["resets"]), "reset_cost": changes, "effective_rank": r.get("effective_rank"),
            "loss_curve": [(int(r["tokens"][i + 9]), sum(r["loss"][i:i + 10]) / 10)
                           for i in range(0, len(r["loss"]) - 9, 10)]}


def report(suite: str, results: dict, out: Path, ref: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ref_mean = statistics.mean(x["eval_ppl"] for x in results[ref])
    # train.seed also draws the validation split, so absolute perplexities move with the seed
    # (seed 2's split is ~14% harder for every row); ratios within a seed share split and data order.
    ref_by_seed = {x["seed"]: x["eval_ppl"] for x in results[ref]}
    lines = [f"| row | eval ppl mean | spread (min-max) | per seed | vs {ref} | per-seed ratio to {ref} "
             "(min-max) | tokens | resets | loss change 20 steps after a cycle boundary | "
             "effective rank of W - W_switch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, recs in results.items():
        ppl = [x["eval_ppl"] for x in recs]
        ratios = [x["eval_ppl"] / ref_by_seed[x["seed"]] for x in recs if x["seed"] in ref_by_seed]
        ratio = (f"{statistics.mean(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})" if ratios else "-")
        costs = [c["loss_after_20"] - c["loss_before"] for x in recs for c in x["reset_cost"]
                 if not math.isnan(c["loss_after_20"])]
        cost = f"{statistics.mean(costs):+.3f}" if costs else "-"
        rank = recs[0]["effective_rank"][-1][1] if recs[0]["effective_rank"] else "-"
        lines.append(f"| {name} | {statistics.mean(ppl):.2f} | {min(ppl):.2f}-{max(ppl):.2f} | "
                     f"{', '.join(f'{p:.2f}' for p in ppl)} | {statistics.mean(ppl) / ref_mean:.3f}x | {ratio} | "
                     f"{recs[0]['tokens']:,} | {recs[0]['resets']} | {cost} | {rank} |")
    gaps = cycle_gaps(results)
    if gaps:
        lines += ["", "Mean train loss over each cycle of the ReLoRA phase minus LoRA's over the same steps "
                  "(seed means; positive: behind LoRA):", "",
                  "| row | " + " | ".join(f"cycle {i + 1}" for i in range(len(next(iter(gaps.values()))))) + " |",
                  "|---|" + "---|" * len(next(iter(gaps.values())))]
        lines += [f"| {n} | " + " | ".join(f"{g:+.3f}" for g in v) + " |" for n, v in gaps.items()]
    leads = paired_leads(results)
    if leads:
        lines += ["", "ReLoRA's lead over LoRA of the same settings, 1 - ReLoRA's eval ppl / LoRA's, same seed "
                  "(the seed also draws the validation split, so rows are compared within a seed):", "",
                  "| ReLoRA row | LoRA row | lead per seed (%) | mean (%) | sd over seeds | mean / standard error |",
                  "|---|---|---|---|---|---|"]
        for (n, lora), lead in leads.items():
            sd = statistics.stdev(lead) if len(lead) > 1 else float("nan")
            t = statistics.mean(lead) / (sd / math.sqrt(len(lead))) if len(lead) > 1 and sd > 0 else float("nan")
            lines.append(f"| {n} | {lora} | {', '.join(f'{x:+.2f}' for x in lead)} | {statistics.mean(lead):+.2f} | "
                         f"{sd:.2f} | {t:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    (out / "results.json").write_text(json.dumps({
        "suite": suite, "model": MODEL, "common": COMMON, "vocab": VOCAB,
        "rows": {n: {"args": SUITES[suite]["rows"][n], "eval_ppl": [x["eval_ppl"] for x in recs],
                     "tokens": recs[0]["tokens"], "resets": recs[0]["resets"],
                     "wall_s": [x["wall_s"] for x in recs], "reset_cost": [x["reset_cost"] for x in recs],
                     "cycle_loss": [x["cycle_loss"] for x in recs],
                     "trainable_params": recs[0]["trainable_params_last"],
                     "effective_rank_end": [x["effective_rank"][-1][1] if x["effective_rank"] else None
                                            for x in recs], "dirs": [x["dir"] for x in recs]}
                 for n, recs in results.items()}}, indent=1) + "\n")
    plot(results, out)


def paired_leads(results: dict) -> dict[tuple[str, str], list[float]]:
    """Per ReLoRA row with a LoRA row of the same name after the prefix (relora_r1_lr1.6e-2 and
    lora_r1_lr1.6e-2): 100 x (1 - ReLoRA's eval ppl / LoRA's) on each seed both ran."""
    out = {}
    for name, recs in results.items():
        lora = "lora" + name[len("relora"):] if name.startswith("relora") else None
        if lora in results:
            base = {x["seed"]: x["eval_ppl"] for x in results[lora]}
            out[(name, lora)] = [100 * (1 - x["eval_ppl"] / base[x["seed"]]) for x in recs if x["seed"] in base]
    return out


def cycle_gaps(results: dict) -> dict[str, list[float]]:
    """Per row with LoRA's cycle windows: seed-mean train loss per cycle minus the lora row's."""
    if "lora" not in results:
        return {}
    def seed_mean(recs):
        return [statistics.mean(v) for v in zip(*(x["cycle_loss"] for x in recs))]
    base = seed_mean(results["lora"])
    return {n: [a - b for a, b in zip(seed_mean(recs), base)] for n, recs in results.items()
            if n != "lora" and len(recs[0]["cycle_loss"]) == len(base)}


def plot(results: dict, out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plots]'); table and results.json written, no plots")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, recs in results.items():
        curve = recs[0]["loss_curve"]
        ax.plot([t for t, _ in curve], [v for _, v in curve], label=f"{name} (seed {recs[0]['seed']})", linewidth=1)
    ax.set_xlabel("tokens")
    ax.set_ylabel("train loss (mean of 10 steps)")
    ax.set_ylim(top=7.0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    fig, ax = plt.subplots(figsize=(max(6, len(results) * 1.1), 3.8))
    names = list(results)
    means = [statistics.mean(x["eval_ppl"] for x in results[n]) for n in names]
    lo = [m - min(x["eval_ppl"] for x in results[n]) for m, n in zip(means, names)]
    hi = [max(x["eval_ppl"] for x in results[n]) - m for m, n in zip(means, names)]
    ax.bar(names, means, yerr=[lo, hi], capsize=4)
    ax.set_ylabel("final eval perplexity (min-max over seeds)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "ppl.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--runs-dir", default="runs/replicate", help="where runs go (default: runs/replicate)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/replication"), help="results folder")
    ap.add_argument("--seeds", type=int, nargs="+", help="override the suite's seeds")
    ap.add_argument("--rows", nargs="+", help="only these rows")
    args = ap.parse_args(argv)
    suite = SUITES[args.suite]
    runs_dir = Path(args.runs_dir).resolve()
    tok = ensure_tokenizer(runs_dir)
    rows = {n: a for n, a in suite["rows"].items() if not args.rows or n in args.rows}
    t0 = time.perf_counter()
    results = {name: [train(name, a, s, runs_dir, tok) for s in (args.seeds or suite["seeds"])]
               for name, a in rows.items()}
    print(f"{args.suite}: {time.perf_counter() - t0:.0f} s wall, "
          f"{sum(x['wall_s'] for r in results.values() for x in r):.0f} s of training")
    report(args.suite, results, Path(args.out) / args.suite, next(iter(rows)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    sys.exit(main())
