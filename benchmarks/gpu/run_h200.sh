#!/usr/bin/env bash
# The GPU benchmarks of docs/benchmarks.md in one go, on a one-GPU machine (an H200, 15 minutes of
# device time): each run is tools/bench.py at world size 1 on CUDA (NCCL, bf16), and each writes
# its own JSON, so a run cut short loses only itself. Usage, from the repository root:
#   OUT=/some/dir bash benchmarks/gpu/run_h200.sh
# Packages the GPU image lacks (deepspeed, bitsandbytes, pydantic, hjson; accelerate, which HF's Trainer
# needs for hf_anchor.py, in case it lacks that too) are read from $SITE, made
# on any x86-64 machine for the image's Python 3.12:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2 pydantic==2.13.4 pydantic_core==2.46.4 \
#     annotated-types typing-inspection hjson accelerate==1.16.0
#   pip wheel --no-deps -w .whl deepspeed==0.19.8
#   pip install --no-deps --target .whl/site --python-version 3.12 --only-binary=:all: \
#     --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 .whl/*.whl
# and the data with tools/prepare_data.py (the image has no `datasets`): .cache/data/L64-*, L512-*.
# A smoke test on CPU: PRESET=tiny SEQ=64 MB=4 DS_ACCELERATOR=cpu PY=python OUT=/tmp/x bash ...
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT to the folder for the JSONs}
mkdir -p "$OUT"
SITE=${SITE:-$PWD/.whl/site}
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
PY=${PY:-python3}
PRESET=${PRESET:-350m} SEQ=${SEQ:-512} MB=${MB:-16}
# Prepared data (the GPU image has no `datasets`): the first cached folder for each length.
DATA_TINY=${DATA_TINY:-$(ls -d "$PWD"/.cache/data/L64-* | head -1)}
DATA=${DATA:-$(ls -d "$PWD"/.cache/data/L"$SEQ"-* | head -1)}
BUDGET=${BUDGET:-540}  # seconds for everything; a run that would not fit is skipped
START=$(date +%s)
log=$OUT/log.txt
: > "$log"
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# ONLY="zero2 profile ...": run just these steps (default: all).
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }

step() {  # name, timeout (s), command... (its output goes to the log)
  local name=$1 t=$2 l rc; shift 2
  want "$name" || return 0
  l=$(left)
  if [ "$l" -lt 45 ]; then echo "=== skip $name: $l s left" | tee -a "$log"; return 1; fi
  [ "$t" -gt "$l" ] && t=$l
  echo "=== $name (timeout $t s) at $(( $(date +%s) - START )) s" | tee -a "$log"
  timeout "$t" "$@" >> "$log" 2>&1
  rc=$?
  echo "=== $name rc=$rc at $(( $(date +%s) - START )) s" | tee -a "$log"
  return $rc
}
bench() {  # name, timeout (s), bench arguments...
  step "$1" "$2" $PY -m relora_dist.bench --out "$OUT/$1.json" "${@:3}"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch, deepspeed, bitsandbytes, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__, 'bitsandbytes', bitsandbytes.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | grep -v Warning | tee -a "$log"

# 1. Smoke test: the whole bench path on the tiny model (stop here if it fails).
bench smoke 150 --prepared-dir "$DATA_TINY" --preset tiny --stages 2 --world-size 1 --steps 2 --warmup 1 --resets 1 --precision bf16 \
  --no-train-extra-false || { tail -60 "$log"; exit 1; }

# 2. What the effective-rank diagnostic (relora.effective_rank_every=0: at every reset, rank 0)
#    costs per reset on this device: fp64 svdvals of every wrapped weight's shape. The bench runs
#    below turn it off (-1) to fit the lease; its time is reported apart from the reset anyway.
want svd && $PY - <<'PY' 2>&1 | tee -a "$log"
import time, torch
from relora_dist.model import PRESETS
dev = "cuda" if torch.cuda.is_available() else "cpu"
p = PRESETS["350m"]
h, i, L = p.hidden_size, p.intermediate_size, p.num_layers
total = gram_total = 0.0
for shape, n in (((h, h), 4), ((i, h), 2), ((h, i), 1)):
    x = torch.randn(*shape, device=dev, dtype=torch.float64)
    torch.linalg.svdvals(x)
    if dev == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter(); torch.linalg.svdvals(x)
    if dev == "cuda": torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    # relora.effective_rank since: the fp64 Gram matrix of the shorter side and eigvalsh
    g = lambda: torch.linalg.eigvalsh(x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x)
    g()
    if dev == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter(); g()
    if dev == "cuda": torch.cuda.synchronize()
    dg = time.perf_counter() - t0
    total += dt * n * L
    gram_total += dg * n * L
    print(f"svdvals fp64 {shape}: {dt:.4f} s, gram+eigvalsh fp64: {dg:.4f} s")
print(f"effective-rank diagnostic at 350m: {total:.1f} s per reset with svdvals, {gram_total:.1f} s with gram+eigvalsh (rank 0)")
# The reset's magnitude-prune thresholds: 672 adapter moments (r=128), one kthvalue each or batched.
from relora_dist.relora.steps import _held_thresholds
r = 128
frags = [torch.randn(n, device=dev) for n in [r * h] * 22 * L + [r * i] * 6 * L]  # 11 and 3 per layer, x2 moments
for batched in (False, True, False, True):
    if dev == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter(); _held_thresholds(frags, 0.9, "kthvalue", batched=batched)
    if dev == "cuda": torch.cuda.synchronize()
    print(f"prune thresholds, {len(frags)} tensors, batched={batched}: {time.perf_counter() - t0:.3f} s")
PY

COMMON=(--prepared-dir "$DATA" --preset "$PRESET" --world-size 1 --precision bf16 --rank 128 --seq-len "$SEQ" --micro-batch "$MB"
        --steps 10 --warmup 3 --resets 2 --merge-repeats 1 --override=--relora.effective_rank_every=-1)
# 2b. Where a step's time goes, full-rank vs ReLoRA phase (ZeRO-2, torch.profiler).
want profile && timeout 120 $PY benchmarks/gpu/profile_steps.py --prepared-dir "$DATA" --preset "$PRESET" \
  --seq-len "$SEQ" --micro-batch "$MB" --rank 128 > "$OUT/profile.txt" 2>&1
want profile && echo "=== profile rc=$? at $(( $(date +%s) - START )) s" | tee -a "$log"

# 3. The configuration users run: ZeRO-2, bf16 (with the train_extra=false row).
bench zero2 150 "${COMMON[@]}" --stages 2
# 3b. The anchor: a plain Hugging Face Trainer + DeepSpeed ZeRO-2 on the same model, data and batch
#     (benchmarks/gpu/hf_anchor.py; 3 untimed + 10 timed steps). The summary prints zero2's
#     full-rank tok/s / this one's. hf_anchor_bucket, at the end, is the same with the project's
#     reduce_bucket_size rule instead of transformers' hidden_size^2.
anchor() {  # name, timeout (s), hf_anchor.py arguments...
  step "$1" "$2" $PY benchmarks/gpu/hf_anchor.py --out "$OUT/$1.json" --prepared-dir "$DATA" --preset "$PRESET" \
    --seq-len "$SEQ" --micro-batch "$MB" --precision bf16 --steps 10 --warmup 3 --peak-flops "${PEAK:-989e12}" "${@:3}"
}
anchor hf_anchor 90
# 4. NF4 base + host merge masters; 5. the same with AdamW8bit for the trainable params.
bench zero2_nf4 110 "${COMMON[@]}" --stages 2 --no-train-extra-false --base-quant nf4 \
  --override=--relora.merge_master_device=cpu
bench zero2_nf4_adamw8bit 110 "${COMMON[@]}" --stages 2 --no-train-extra-false --base-quant nf4 \
  --override=--relora.merge_master_device=cpu --override=--optimizer.name=adamw8bit
# 6. The other engines.
bench zero3_fsdp2 170 "${COMMON[@]}" --stages 3 fsdp2 --no-train-extra-false
# 7. A micro-batch that fills memory (64 x 512 at 350m), eager and with train.compile (the first
#    steps of each phase compile; --warmup 3 keeps them out of the timed ones).
bench zero2_mb64 150 "${COMMON[@]}" --stages 2 --no-train-extra-false --micro-batch 64
bench zero2_mb64_compile 200 "${COMMON[@]}" --stages 2 --no-train-extra-false --micro-batch 64 \
  --override=--train.compile=true
# 8. The anchor again with the project's bucket rule (the trainable elements: one reduction per step).
anchor hf_anchor_bucket 90 --reduce-bucket-size trainable
# MFU per phase of every JSON: tokens/s x model FLOPs per token (relora_dist.model.flops_per_token,
# the same in both phases) / the device's bf16 peak (PEAK, default the H100/H200's 989e12).
$PY - "$OUT" "${PEAK:-989e12}" <<'PY' 2>&1 | tee -a "$log" "$OUT/mfu.txt"
import json, sys
from pathlib import Path
from transformers import LlamaConfig
from relora_dist.model import flops_per_token
out, peak = Path(sys.argv[1]), float(sys.argv[2])
for path in sorted(out.glob("*.json")):
    data = json.loads(path.read_text())
    for name, s in data.get("stages", {}).items():
        m, tps = s.get("model"), s.get("tokens_per_s")
        if not m or not tps:
            continue
        cfg = LlamaConfig(hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                          num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
                          vocab_size=m["vocab_size"])
        f = flops_per_token(cfg, data["config"]["seq_len"])
        print(f"{path.stem} stage {name}: MFU " + ", ".join(f"{ph} {v * f / peak:.1%}" for ph, v in tps.items()))
# The anchors (plain HF Trainer + DeepSpeed ZeRO-2, same model and batch): MFU with the same
# flops_per_token and peak, and the project's ZeRO-2 full-rank tok/s over theirs (target >= 1.5).
ours = json.loads((out / "zero2.json").read_text())["stages"]["2"]["tokens_per_s"]["full_rank"] \
    if (out / "zero2.json").is_file() else None
for name in ("hf_anchor", "hf_anchor_bucket"):
    if not (out / f"{name}.json").is_file():
        continue
    a = json.loads((out / f"{name}.json").read_text())
    line = f"{name}: {a['tokens_per_s']:.0f} tok/s, MFU {a['tokens_per_s'] * a['flops_per_token'] / peak:.1%}"
    if ours:
        line += f"; zero2 full-rank / {name} tok/s = {ours / a['tokens_per_s']:.2f} (target >= 1.5)"
    print(line)
PY
echo "=== done at $(( $(date +%s) - START )) s" | tee -a "$log"
