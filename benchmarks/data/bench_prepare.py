#!/usr/bin/env python
"""Throughput, memory and disk of relora-prepare-data on a synthetic C4-like corpus.

For each size (MB of JSON lines) it writes .jsonl.gz files of ~32 MB (C4's layout: many gzipped JSON
lines files) made of the bundled corpus's chapters, each copy headed by its copy number so documents
differ (and, with --formats gz jsonl, the same files decompressed), then runs relora-prepare-data at
each --procs in one invocation (same machine, same files) and records: tokens/s, the ratio of each
process count's rate to one process's, the CPU time of the main process (it only schedules: the
workers read the inputs), the peak memory (PSS) of the whole process tree (sampled every 50 ms), the
peak bytes on disk beyond the final output (the temporary folder, the manifest), and an
extrapolation to 6.9B tokens on 32 cores.

    flock -x /tmp/relora-heavy.lock python benchmarks/data/bench_prepare.py --sizes_mb 100 \
        --formats gz jsonl --alone --out benchmarks/data/bench_prepare_100mb_workers.json
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import lzma
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from relora_dist.resources import CORPUS  # noqa: E402

FILE_MB = 32


def build_corpus(folder: Path, size_mb: int, plain: bool = False) -> list[str]:
    docs = [json.loads(line)["text"] for line in lzma.decompress(Path(CORPUS).read_bytes()).splitlines()]
    folder.mkdir(parents=True, exist_ok=True)
    files, written, copy, k = [], 0, 0, 0
    while written < size_mb << 20:
        lines, size = [], 0
        while size < FILE_MB << 20 and written + size < size_mb << 20:
            for d in docs:
                line = json.dumps({"text": f"Copy {copy}.\n\n{d}", "url": "", "timestamp": ""}) + "\n"
                lines.append(line)
                size += len(line)
            copy += 1
        path = folder / f"c4-train.{k:05d}-of-01024.json{'' if plain else '.gz'}"
        data = "".join(lines).encode()
        path.write_bytes(data if plain else gzip.compress(data, compresslevel=1))
        files.append(str(path))
        written, k = written + size, k + 1
    return files


def _tree_rss(proc: psutil.Process) -> tuple[int, int, int]:
    """(memory of the tree, of the main process, of its largest child): PSS, each shared page divided
    among its sharers. RSS would count a worker being spawned (forked from the main process, before
    its exec) at the main process's size: measured 225 MB for ~90 MB workers."""
    rss = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss.append(p.memory_full_info().pss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            rss.append(0)
    return sum(rss), rss[0], max(rss[1:], default=0)


def _disk(folder: Path) -> int:
    total = 0
    for root, _, names in os.walk(folder):
        for n in names:
            try:
                total += os.path.getsize(os.path.join(root, n))
            except OSError:
                pass
    return total


def run_once(files: list[str], work: Path, procs: int, shard_tokens: int) -> dict:
    out_root = work / f"out-{procs}"
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--input", *files, "--out", str(out_root / "d"),
           "--seq_len", "1024", "--num_proc", str(procs), "--shard_tokens", str(shard_tokens)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(p.pid)
    peak_rss = peak_disk = peak_main = peak_child = main_cpu = 0
    shard_times: list[tuple[float, int]] = []
    while p.poll() is None:
        tree, main, child = _tree_rss(ps)
        peak_rss, peak_main, peak_child = max(peak_rss, tree), max(peak_main, main), max(peak_child, child)
        peak_disk = max(peak_disk, _disk(out_root))
        with contextlib.suppress(psutil.Error):
            main_cpu = sum(ps.cpu_times()[:2])
        for m in out_root.glob(".d.tmp-*/manifest.jsonl"):  # when each shard was recorded
            with contextlib.suppress(OSError, ValueError):
                for line in m.read_text().splitlines()[1 + len(shard_times):]:
                    e = json.loads(line)
                    shard_times.append((time.perf_counter(), e["train"]["tokens"] + e["val"]["tokens"]))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    stdout, stderr = p.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if p.returncode:
        raise SystemExit(f"prepare failed ({p.returncode}): {stderr[-2000:]}")
    meta = json.loads((out_root / "d" / "meta.json").read_text())
    tokens = sum(meta["num_tokens"].values())
    output = _disk(out_root / "d")
    shutil.rmtree(out_root)
    # Between the first and the last recorded shard: the rate without start-up (imports, hashing the inputs).
    steady = (sum(n for _, n in shard_times[1:]) / (shard_times[-1][0] - shard_times[0][0])
              if len(shard_times) > 2 else tokens / wall)
    return {"procs": procs, "wall_s": round(wall, 2), "tokens": tokens, "tok_per_s_wall": round(tokens / wall),
            "tok_per_s": round(steady), "cpu_s": round(cpu, 2), "cores_busy": round(cpu / wall, 2),
            "main_cpu_s": round(main_cpu, 2),
            "peak_rss_mb": round(peak_rss / 2**20, 1), "peak_rss_main_mb": round(peak_main / 2**20, 1),
            "peak_rss_worker_mb": round(peak_child / 2**20, 1), "output_bytes": output,
            "extra_disk_bytes": max(0, peak_disk - output), "extra_disk_fraction": round(max(0, peak_disk - output)
                                                                                        / output, 5),
            "shards": len(meta.get("shards", {}).get("train", [None]))}


def _spin(_):
    t = time.process_time()
    s = 0
    for i in range(10_000_000):
        s += i
    return time.process_time() - t


def machine_parallelism(n: int) -> float:
    """Speed-up of n spawned processes spinning on n equal tasks over one process: what this machine
    gives right now (other jobs take cores); the preparation's ratio cannot exceed it."""
    import multiprocessing as mp

    times = []
    for procs in (1, n):
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(procs) as pool:
            pool.map(_spin, range(n))
        times.append(time.perf_counter() - t0)
    return round(times[0] / times[1], 3)


def summarize(result: dict, shard_tokens: int = 1 << 27) -> None:
    """The extrapolation to 6.9B tokens on 32 cores, per input format, from the largest size's runs."""
    size = max(result["sizes"], key=int)
    out = {"assumes": "tokens/s of the 1-process run (wall clock, counting pass and start-up included) x 32 x "
                      "the parallel efficiency measured here (2-process ratio / 2) x the wave efficiency of "
                      f"{shard_tokens}-token units on 32 processes (units / (32 x ceil(units / 32)): the last "
                      "wave leaves cores idle); the main process only schedules (see main_cpu_s), so it sets "
                      "no ceiling"}
    units = -(-6.9e9 // shard_tokens)
    waves = units / (32 * -(-units // 32))
    out["units"], out["wave_efficiency"] = int(units), round(waves, 3)
    for fmt, runs in result["sizes"][size].items():
        one = runs["runs"][0]
        eff = max(r["ratio_to_1proc_wall"] / r["procs"] for r in runs["runs"][1:]) if len(runs["runs"]) > 1 else 1.0
        rate = one["tok_per_s_wall"] * 32 * eff * waves
        out[fmt] = {"parallel_efficiency": round(eff, 3), "tok_per_s": round(rate),
                    "minutes": round(6.9e9 / rate / 60, 1),
                    "peak_rss_mb_estimate": round(max(r["peak_rss_main_mb"] for r in runs["runs"])
                                                  + 32 * max(r["peak_rss_worker_mb"] for r in runs["runs"][1:] or runs["runs"]))}
    result["extrapolation_6p9B_tokens_32_cores"] = out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes_mb", type=int, nargs="+", default=[100, 250], help="corpus sizes (default: 100 250)")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="--num_proc values (default: 1 2)")
    ap.add_argument("--shard_tokens", type=int, default=1 << 20,
                    help="(default: 2^20: ~25 units at 100 MB, so 2 processes share the work evenly)")
    ap.add_argument("--formats", nargs="+", default=["gz"], choices=["gz", "jsonl"],
                    help="input files: gzipped JSON lines and/or the same files plain (default: gz)")
    ap.add_argument("--alone", action="store_true",
                    help="say in the result that nothing else ran (run it under flock -x of the shared lock)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--out", default=None, help="write the JSON result here (default: print only)")
    a = ap.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-prepare-"))
    result = {"machine": {"cpus": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
                          "platform": platform.platform(), "python": platform.python_version(),
                          "loadavg_start": os.getloadavg(),
                          "note": "ran alone: exclusive lock, no other benchmark or test beside it" if a.alone else
                          "shared machine: other jobs may have run beside this benchmark (see loadavg)"},
              "config": vars(a), "sizes": {}}
    try:
        for size in a.sizes_mb:
            result["sizes"][str(size)] = {}
            for fmt in a.formats:
                files = build_corpus(work / f"corpus-{size}-{fmt}", size, plain=fmt == "jsonl")
                control = [machine_parallelism(max(a.procs))]
                runs = [run_once(files, work, n, a.shard_tokens) for n in a.procs]
                control.append(machine_parallelism(max(a.procs)))
                for r in runs:
                    r["ratio_to_1proc"] = round(r["tok_per_s"] / runs[0]["tok_per_s"], 3)
                    r["ratio_to_1proc_wall"] = round(r["tok_per_s_wall"] / runs[0]["tok_per_s_wall"], 3)
                    r["loadavg_after"] = os.getloadavg()
                result["sizes"][str(size)][fmt] = {"input_bytes": sum(os.path.getsize(f) for f in files),
                                                   "runs": runs, "machine_parallelism_before_after": control}
                shutil.rmtree(work / f"corpus-{size}-{fmt}")
                print(json.dumps({size: {fmt: runs}}), flush=True)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    summarize(result)
    result["machine"]["loadavg_end"] = os.getloadavg()
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["extrapolation_6p9B_tokens_32_cores"]))
    return result


if __name__ == "__main__":
    main()
