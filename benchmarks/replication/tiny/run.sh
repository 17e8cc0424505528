#!/usr/bin/env bash
# Tiny-scale replication of the paper's Table 2 rows on the bundled corpus (2 CPU cores).
# Every row sees the same tokens: 400 steps x 16 sequences x 128 tokens = 819,200 tokens
# (~0.9 epoch of the 0.91M-token training split). Model: the tiny preset (hidden 128,
# intermediate 344, 4 heads) with 4 layers and the bundled 8k vocabulary; ~12 minutes in all.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-runs/replication}
COMMON=(--model.preset=tiny --model.num_layers=4
        --data.seq_len=128 --train.max_steps=400 --train.global_batch_size=16 --train.micro_batch_size=16
        --train.eval_every=100 --train.eval_tokens=32768 --optimizer.lr=2e-3 --schedule.warmup_steps=30
        --logging.progress_bar=false --logging.log_every=100 --checkpoint.resume= --checkpoint.overwrite=true
        --run.export_warm_start=false)
RELORA=(--relora.r=16 --relora.alpha=16 --relora.cycle_length=100 --relora.first_warmup=20
        --relora.restart_warmup=10 --relora.optimizer_reset=magnitude --relora.prune_ratio=0.9)
run() { local name=$1; shift; echo "== $name"; python launchers/pretrain.py "${COMMON[@]}" --run.output_dir="$OUT/$name" "$@" 2>&1 | grep -E "^(step|done|==)" | tail -4; }
run full_rank      --relora.enabled=false
run relora         "${RELORA[@]}" --relora.warm_start_steps=100
run lora           "${RELORA[@]}" --relora.warm_start_steps=100 --relora.resets=false
run relora_no_warm "${RELORA[@]}" --relora.warm_start_steps=0
# control: full-rank training of a smaller model with about ReLoRA's trainable-parameter count
# (ReLoRA trains 2.21M: adapters 0.16M + embeddings/head 2.05M + norms; 1 layer gives 2.25M)
run control        --relora.enabled=false --model.num_layers=1
python tools/compare_runs.py --out benchmarks/replication/tiny --runs full_rank="$OUT/full_rank" \
  relora="$OUT/relora" lora="$OUT/lora" relora_no_warm="$OUT/relora_no_warm" control="$OUT/control"
