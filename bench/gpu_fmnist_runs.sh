#!/usr/bin/env bash
# One time-boxed GPU session for issue 3: cae_base@224 training throughput, then the Fashion-MNIST
# default recipe (two seeds) and the paper's three ablations pretrained side by side on one GPU for the
# same number of epochs, then evaluated (kNN, linear, attentive; fine-tuning for seed 0) together with
# the random-init encoder. The epoch count is chosen from a short probe so that everything ends inside
# BUDGET seconds; it is printed and saved in every run's config.yaml.
#
#   bash bench/gpu_fmnist_runs.sh OUT_DIR [BUDGET_S]        # BUDGET_S default 540
#
# Needs a CUDA GPU, the package's training dependencies and Fashion-MNIST under
# /usr/share/datasets/fashion-mnist (or FMNIST_SRC=DIR with the four .gz files, copied there).
set -u
OUT=${1:?usage: gpu_fmnist_runs.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-540}
DEVICE=${DEVICE:-cuda}
T0=$(date +%s)
W=${WORK:-/tmp/cae_gpu}
mkdir -p "$OUT" "$W"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
left() { echo $((T0 + BUDGET - $(date +%s))); }
say() { echo "[gpu-job +$(($(date +%s) - T0))s] $*"; }

if [ -n "${FMNIST_SRC:-}" ]; then
  mkdir -p /usr/share/datasets/fashion-mnist && cp "$FMNIST_SRC"/*.gz /usr/share/datasets/fashion-mnist/
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
nproc

say "1. cae_base@224 training-step throughput (bf16 vs fp32, MFU vs 989 TFLOP/s dense bf16)"
[ "$DEVICE" = cuda ] && timeout 75 python3 bench/train_throughput.py cae_base_800e --batch 128 --steps 10 --device cuda --peak-tflops 989
say "GPU test of the suite (DALL-E tokenizer fp16 on CUDA)"
[ "$DEVICE" = cuda ] && timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_dalle_tokenizer.py -k cuda 2>&1 | tail -3

# name|extra overrides
RUNS=(
  "s0|"
  "s1|runtime.seed=1"
  "no_align|model.overrides.align_loss_weight=0.0"
  "mae|model.overrides.arch=mae"
  "align_only|model.overrides.recon_loss_weight=0.0"
)

# EXTRA / EVAL_EXTRA: more k=v overrides (a CPU smoke test of this script: DEVICE=cpu with tiny settings)
read -r -a EXTRA_A <<<"${EXTRA:-}"
read -r -a EVAL_EXTRA_A <<<"${EVAL_EXTRA:-}"
EVAL_SETS=(); for kv in "${EVAL_EXTRA_A[@]}"; do EVAL_SETS+=(--set "$kv"); done
COMMON=(runtime.device="$DEVICE" data.num_workers=2 runtime.save_every_steps=0 runtime.keep_last=1 "${EXTRA_A[@]}")

overrides() {  # $1 = extra ("" or k=v)
  local a=()
  for kv in "${COMMON[@]}" $1; do a+=(--set "$kv"); done
  printf '%s\n' "${a[@]}"
}

say "2. probe: all five runs for 80 steps at once, to measure the contended rate"
for r in "${RUNS[@]}"; do
  name=${r%%|*}; extra=${r#*|}
  mapfile -t ov < <(overrides "$extra")
  timeout 90 python3 training/run.py pretrain --config fmnist_cae "${ov[@]}" --set runtime.max_steps=80 \
    --set runtime.log_every=20 --set optim.epochs=100 --output-dir "$W/probe_$name" >"$W/probe_$name.log" 2>&1 &
done
wait
EPOCHS=$(python3 - "$W" "$(left)" "${BATCH:-256}" "${NTRAIN:-60000}" <<'EOF'
import json, sys, pathlib
w, left, b, n = pathlib.Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rates = []
for m in sorted(w.glob("probe_*/metrics.jsonl")):
    recs = {r["step"]: r for r in map(json.loads, m.read_text().splitlines()) if r.get("kind") == "train"}
    if 40 in recs and 80 in recs:  # img_per_s is cumulative since the epoch start: difference two points
        t40, t80 = 40 * b / recs[40]["img_per_s"], 80 * b / recs[80]["img_per_s"]
        rates.append(40 * b / (t80 - t40))
print(f"probe rates (img/s): {[round(r) for r in rates]}", file=sys.stderr)
if len(rates) < 5:
    print(0); sys.exit()
train_s = left - 160 - 20  # leave 160 s for evaluation and packing, 20 s for start-up
per_epoch = n / min(rates) * 1.04 + 1.0  # +4% for the log steps' syncs, +1 s epoch overhead
print(max(4, min(400, int(train_s / per_epoch))))
EOF
)
say "probe logs:"; tail -n 3 "$W"/probe_s0.log
if [ "${EPOCHS:-0}" -lt 1 ]; then say "probe failed"; tail -n 30 "$W"/probe_*.log; exit 1; fi
say "3. pretraining 5 runs x $EPOCHS epochs"
for r in "${RUNS[@]}"; do
  name=${r%%|*}; extra=${r#*|}
  mapfile -t ov < <(overrides "$extra")
  timeout $(($(left) - 120)) python3 training/run.py pretrain --config fmnist_cae "${ov[@]}" \
    --set optim.epochs="$EPOCHS" --set runtime.save_every_epochs=$((EPOCHS / 4 > 0 ? EPOCHS / 4 : 1)) \
    --set runtime.recon_every_epochs=$((EPOCHS / 4 > 0 ? EPOCHS / 4 : 1)) \
    --output-dir "$W/$name" >"$W/$name.log" 2>&1 &
done
while [ -n "$(jobs -r)" ]; do sleep 20; say "$(for r in "${RUNS[@]}"; do n=${r%%|*}; echo -n "$n: $(grep -o 'epoch [0-9]*/[0-9]*' "$W/$n.log" | tail -1) "; done)"; done
wait

say "4. evaluation"
evalchain() {  # $1 = checkpoint, $2 = dir; protocols in order, each time-boxed by what is left
  local ck=$1 d=$2; mkdir -p "$d"
  for pr in "knn" "linear" "knn feature=mean" "linear feature=mean" "attentive"; do
    set -- $pr; local proto=$1 tag=$1; local sets=()
    if [ $# -gt 1 ]; then sets=(--set "$2"); tag="${1}_${2#feature=}"; fi
    [ "$(left)" -lt 25 ] && break
    timeout $(($(left) - 20)) python3 training/run.py eval --checkpoint "$ck" --protocol "$proto" \
      --dataset fashion-mnist --device "$DEVICE" --json --cache-dir "$d/cache" "${sets[@]}" "${EVAL_SETS[@]}" \
      >"$d/eval_$tag.json" 2>"$d/eval_$tag.log"
  done
}
for r in "${RUNS[@]}"; do
  name=${r%%|*}
  [ -f "$W/$name/model.safetensors" ] && evalchain "$W/$name/model.safetensors" "$W/$name" &
done
evalchain random:fmnist_cae "$W/random" &
if [ -f "$W/s0/model.safetensors" ]; then
  timeout $(($(left) - 20)) python3 training/run.py eval --checkpoint "$W/s0/model.safetensors" --protocol finetune \
    --dataset fashion-mnist --device "$DEVICE" --json --cache-dir "$W/s0/cache" --set epochs=10 --set num_workers=2 "${EVAL_SETS[@]}" \
    >"$W/s0/eval_finetune.json" 2>"$W/s0/eval_finetune.log" &
fi
wait

say "5. results"
for d in "$W"/s0 "$W"/s1 "$W"/no_align "$W"/mae "$W"/align_only "$W"/random; do
  for f in "$d"/eval_*.json; do [ -s "$f" ] && echo "$(basename "$d") $(basename "$f" .json) $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['top1'])" "$f")"; done
done | tee "$W/summary.txt"
cd "$W" && tar czf "$OUT/results.tar.gz" --exclude='*/cache' --exclude='*.pth' --exclude='*/model.safetensors' \
  --exclude='probe_*/*' summary.txt *.log s0 s1 no_align mae align_only random 2>/dev/null
for n in s0 s1; do [ -f "$n/model.safetensors" ] && split -b 15M -d "$n/model.safetensors" "$OUT/$n.model.safetensors.part"; done
say "done"
