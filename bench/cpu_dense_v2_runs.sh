#!/usr/bin/env bash
# Issue 14: the v2 dense heads on ONE CPU core, sequentially (segmentation, then detection), each
# time-boxed so both finish by a deadline. Usage: bash bench/cpu_dense_v2_runs.sh [DEADLINE_UTC=01:45]
# Scenes first:  python -m training.dense.scenes runs/scenes_v2 --train 4000 --test 500 --preset v2
#                python -m training.dense.scenes runs/scenes_shifted --train 0 --test 500 --preset shifted
set -euo pipefail
deadline=${1:-01:45}
run() { OMP_NUM_THREADS=1 taskset -c 1 python training/run.py "$@"; }
minutes_left() { echo $(( ($(date -u -d "$deadline" +%s) - $(date -u +%s)) / 60 )); }

# seg: 700 scenes x 6 epochs (~2 img/s at 96 px, bf16); the box shortens the epochs if the core is shared
run segment --config fmnist_scenes_v2_upernet --set data.limit_train=700 --set data.limit_val=500 \
  --set optim.epochs=6 --set runtime.time_limit_min=36 --output-dir runs/seg_v2 --resume
# det: until 01:27 (~1.5 img/s at 96 px, bf16); the box shortens the epochs if the core is shared
det_deadline=01:27
run detect --config fmnist_scenes_v2_maskrcnn --set data.limit_train=600 --set data.limit_val=200 \
  --set optim.epochs=9 --set runtime.time_limit_min="$(( ($(date -u -d "$det_deadline" +%s) - $(date -u +%s)) / 60 - 1 ))" \
  --output-dir runs/det_v2 --resume
# seg leg 2: resume the 2-epoch seg run as a 4-epoch one (a warm restart of the cosine, then annealed);
# no time box (it would reserve a whole epoch for the evaluation and cut the leg to one unannealed epoch)
cp runs/seg_v2/segment.safetensors runs/seg_v2/segment_leg1.safetensors
cp runs/seg_v2/results.json runs/seg_v2/results_leg1.json
run segment --config fmnist_scenes_v2_upernet --set data.limit_train=700 --set data.limit_val=200 \
  --set optim.epochs=4 --output-dir runs/seg_v2 --resume
