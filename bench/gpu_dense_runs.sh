#!/usr/bin/env bash
# One time-boxed GPU session for issue 6: UperNet segmentation and Mask R-CNN detection on the
# Fashion-MNIST scenes, each on the default CAE encoder and on the random-init encoder, all four at once.
# Every run is time-boxed (runtime.time_limit_min: the schedule shrinks to the epochs that fit after the
# first epoch, so it still anneals, evaluates and writes its model).
#
#   bash bench/gpu_dense_runs.sh OUT_DIR SCENES_DIR [BUDGET_S]
#
# SCENES_DIR: written by `python training/run.py scenes --out DIR --train 4000 --test 1000`.
# DEVICE=cpu with EXTRA="data.limit_train=32 ..." gives a CPU smoke test of this script.
set -u
OUT=${1:?usage: gpu_dense_runs.sh OUT_DIR SCENES_DIR [BUDGET_S]}
SCENES=${2:?scenes dir}
BUDGET=${3:-170}
DEVICE=${DEVICE:-cuda}
T0=$(date +%s)
W=${WORK:-/tmp/cae_dense}
mkdir -p "$OUT" "$W"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
say() { echo "[dense-job +$(($(date +%s) - T0))s] $*"; }
read -r -a EXTRA_A <<<"${EXTRA:-}"
# minutes for each run's own box: the budget less start-up, final evaluation and packing
LIMIT=$(python3 -c "print(round(max(($BUDGET - 45) / 60, 0.3), 2))")

run() {  # name task preset extra...
  local name=$1 task=$2 preset=$3; shift 3
  local sets=(--set runtime.device="$DEVICE" --set data.root="$SCENES" --set data.num_workers=3
              --set runtime.time_limit_min="$LIMIT" --set runtime.eval_every_epochs=1000
              --set runtime.vis_every_epochs=1000)
  for kv in "$@" "${EXTRA_A[@]}"; do sets+=(--set "$kv"); done
  timeout $((BUDGET - 8)) python3 training/run.py "$task" --config "$preset" "${sets[@]}" --output-dir "$W/$name" \
    >"$W/$name.log" 2>&1
}
say "4 runs, each boxed to $LIMIT min"
run seg_cae segment fmnist_scenes_upernet optim.epochs=40 &
run seg_random segment fmnist_scenes_upernet optim.epochs=40 model.checkpoint=random:fmnist_cae &
run det_cae detect fmnist_scenes_maskrcnn optim.epochs=24 &
run det_random detect fmnist_scenes_maskrcnn optim.epochs=24 model.checkpoint=random:fmnist_cae &
while [ -n "$(jobs -r)" ]; do
  sleep 15
  say "$(for n in seg_cae seg_random det_cae det_random; do echo -n "$n: $(grep -o 'epoch [0-9]*/[0-9]* step [0-9]*/[0-9]*' "$W/$n.log" | tail -1) | "; done)"
done
wait
for n in seg_cae seg_random det_cae det_random; do
  echo "== $n"; grep -E "shortening|eval after|wrote|Error|error" "$W/$n.log" | tail -5
done
cd "$W" && tar czf "$OUT/dense_results.tar.gz" --exclude='*.pth' --exclude='*.safetensors' ./*.log seg_cae seg_random det_cae det_random
for n in seg_cae det_cae; do
  f=$(ls "$n"/*.safetensors 2>/dev/null | head -1)
  [ -n "$f" ] && split -b 15M -d "$f" "$OUT/$n.$(basename "$f").part"
done
say "done"
