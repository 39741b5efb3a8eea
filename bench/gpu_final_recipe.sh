#!/usr/bin/env bash
# One time-boxed GPU session for issue 12 (items 6-8): the shipped default model's whole recipe, from
# scratch, and the paper's ablation at that recipe, two seeds each, side by side on one GPU, plus the
# fine-tuning pair (the shipped encoder vs random init, the CPU recipe) in the background.
#
#   bash bench/gpu_final_recipe.sh OUT_DIR [BUDGET_S]        # BUDGET_S default 540
#
# The recipe is the shipped one (docs/results.md section 0), with each stage a plain cosine schedule:
#   stage 1  fmnist_cae                 (CAE, pixel targets; the shipped model: 22 epochs)
#   stage 2  fmnist_cae_ct              (+ InfoNCE on cls, zoom-out views; shipped: 10 epochs, resumed once)
#   stage 3  fmnist_cae_ct_last4_w2     (InfoNCE on the served last4 readout, weight 2; shipped: 4 epochs)
# Every variant runs the same three stages with its own overrides (no alignment, MAE-style, alignment
# only), so compute is equal; the epochs keep the shipped 22:10:4 proportions, scaled by a short probe
# of the contended rates so that everything ends inside BUDGET seconds (printed, and saved in every run's
# config.yaml). Then every final encoder and the random init are evaluated on the served readout (last4):
# kNN and linear on the test set and the shifted test set, attentive on the test set.
#
# Environment: DEVICE (cuda), VARIANTS ("name|k=v k=v" lines; default 4 methods x seeds 0, 1),
# FT_EPOCHS (30), FT_SETS (the fine-tuning recipe's overrides), EXTRA / EVAL_EXTRA (more k=v overrides
# for every pretraining stage / evaluation: a CPU smoke test of this script runs with DEVICE=cpu and tiny
# settings), NTRAIN (training images per epoch, for the sizing; 60000), FMNIST_SRC=DIR (the four .gz
# files, copied to /usr/share/datasets/fashion-mnist). Needs the package's training dependencies.
set -u
OUT=${1:?usage: gpu_final_recipe.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-540}
DEVICE=${DEVICE:-cuda}
T0=$(date +%s)
W=${WORK:-/tmp/cae_final}
mkdir -p "$OUT" "$W"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
left() { echo $((T0 + BUDGET - $(date +%s))); }
say() { echo "[final-recipe +$(($(date +%s) - T0))s] $*"; }

if [ -n "${FMNIST_SRC:-}" ]; then
  mkdir -p /usr/share/datasets/fashion-mnist && cp "$FMNIST_SRC"/*.gz /usr/share/datasets/fashion-mnist/
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"

DEFAULT_VARIANTS="cae_s0|runtime.seed=0
cae_s1|runtime.seed=1
no_align_s0|model.overrides.align_loss_weight=0.0
no_align_s1|model.overrides.align_loss_weight=0.0 runtime.seed=1
mae_s0|model.overrides.arch=mae
mae_s1|model.overrides.arch=mae runtime.seed=1
align_only_s0|model.overrides.recon_loss_weight=0.0
align_only_s1|model.overrides.recon_loss_weight=0.0 runtime.seed=1"
mapfile -t RUNS <<<"${VARIANTS:-$DEFAULT_VARIANTS}"
read -r -a EXTRA_A <<<"${EXTRA:-}"
read -r -a EVAL_EXTRA_A <<<"${EVAL_EXTRA:-}"
EVAL_SETS=(); for kv in "${EVAL_EXTRA_A[@]}"; do EVAL_SETS+=(--set "$kv"); done
COMMON=(runtime.device="$DEVICE" data.num_workers=2 runtime.save_every_steps=0 runtime.keep_last=1 runtime.tensorboard=false "${EXTRA_A[@]}")
STAGES=(fmnist_cae fmnist_cae_ct fmnist_cae_ct_last4_w2)

sets() {  # k=v words -> --set k=v lines
  local kv
  for kv in "${COMMON[@]}" $1; do printf -- '--set\n%s\n' "$kv"; done
}

say "1. fine-tuning in the background: the shipped encoder and random init, the same recipe and epochs"
FT_SETS=${FT_SETS:-"lr=2e-3 warmup_epochs=1 reprob=0.25 eval_every=3"}
finetune() {  # $1 = checkpoint, $2 = name
  local a=(); for kv in $FT_SETS "${EVAL_EXTRA_A[@]}"; do a+=(--set "$kv"); done
  timeout $(($(left) - 15)) python3 training/run.py eval --checkpoint "$1" --protocol finetune \
    --dataset fashion-mnist --device "$DEVICE" --json --set epochs="${FT_EPOCHS:-30}" "${a[@]}" \
    --output-dir "$W/ft_$2" >"$W/ft_$2.json" 2>"$W/ft_$2.log"
}
finetune models/default/model.safetensors default &
finetune random:fmnist_cae random &

say "2. probe: every variant at once, stage 1 then stage 2, 60 steps each, for the contended rates"
probe() {  # $1 = preset, $2 = tag
  local r name extra pids=()
  for r in "${RUNS[@]}"; do
    name=${r%%|*}; extra=${r#*|}
    mapfile -t ov < <(sets "$extra")
    timeout 100 python3 training/run.py pretrain --config "$1" "${ov[@]}" --set model.init_from=null \
      --set runtime.max_steps=60 --set runtime.log_every=20 --set optim.epochs=100 \
      --output-dir "$W/probe_$2_$name" >"$W/probe_$2_$name.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"  # the fine-tunes keep running
}
probe fmnist_cae s1
probe fmnist_cae_ct s2
read -r E1 E2 E3 < <(python3 - "$W" "$(left)" "${NTRAIN:-60000}" <<'EOF'
import json, pathlib, sys
import yaml
w, left, n = pathlib.Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
def rate(tag: str) -> float:
    rates = []
    for m in sorted(w.glob(f"probe_{tag}_*/metrics.jsonl")):
        b = int(yaml.safe_load((m.parent / "config.yaml").read_text())["optim"]["batch_size"])
        recs = list(map(json.loads, m.read_text().splitlines()))
        ep = [r for r in recs if r.get("kind") == "epoch"]
        first = [r for r in recs if r.get("kind") == "train" and r["epoch"] == 0]
        if len(ep) >= 3:  # whole epochs after the first (its warm-up), by their own seconds
            rates.append((ep[-1]["step"] - ep[0]["step"]) * b / sum(r["seconds"] for r in ep[1:]))
        elif len(first) >= 2:  # within epoch 0: img_per_s is cumulative since its start, so difference
            (s0, r0), (s1, r1) = ((r["step"], r["img_per_s"]) for r in (first[0], first[-1]))
            rates.append((s1 - s0) * b / (s1 * b / r1 - s0 * b / r0))
    print(f"probe {tag} rates (img/s): {[round(r) for r in rates]}", file=sys.stderr)
    return min(rates) if rates else 0.0
r1, r2 = rate("s1"), rate("s2")
if not (r1 and r2):
    print(0, 0, 0); sys.exit()
train_s = left - 200  # evaluation (~150 s), three start-ups per chain, packing
# per chain: n/r1*22f + n/r2*(10f + 4f*1.1) (stage 3's last4 head is a little wider than stage 2's)
f = max(train_s - 3 * 25, 0) / (n * (22 / r1 + 14.4 / r2) * 1.05)  # 25 s per stage start-up
e = [max(1, round(22 * f)), max(1, round(10 * f)), max(1, round(4 * f))]
print(f"scale {f:.3f} of the shipped 22:10:4 epochs", file=sys.stderr)
print(*e)
EOF
)
if [ "${E1:-0}" -lt 1 ]; then say "probe failed"; tail -n 30 "$W"/probe_*.log; exit 1; fi
say "3. pretraining ${#RUNS[@]} chains x ($E1, $E2, $E3) epochs (stages: ${STAGES[*]})"
EPOCHS=("$E1" "$E2" "$E3")
chain() {  # $1 = name, $2 = overrides
  local i init="" ov
  mapfile -t ov < <(sets "$2")
  for i in 0 1 2; do
    [ "$(left)" -lt 170 ] && { echo "no time for stage $((i + 1))"; return; }
    timeout $(($(left) - 160)) python3 training/run.py pretrain --config "${STAGES[$i]}" "${ov[@]}" \
      --set model.init_from="${init:-null}" --set optim.epochs="${EPOCHS[$i]}" \
      --output-dir "$W/$1/stage$((i + 1))" || return
    init="$W/$1/stage$((i + 1))/model.safetensors"
    [ -f "$init" ] || return
  done
  python3 -m export convert "$init" "$W/$1/final.safetensors" --readout last4
}
CHAINS=()
for r in "${RUNS[@]}"; do
  name=${r%%|*}; extra=${r#*|}
  chain "$name" "$extra" >"$W/$name.log" 2>&1 &
  CHAINS+=($!)
done
running() { local p n=0; for p in "${CHAINS[@]}"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done; echo $n; }
while [ "$(running)" -gt 0 ]; do
  sleep 20
  say "$(for r in "${RUNS[@]}"; do n=${r%%|*}; echo -n "$n: $(grep -o 'stage[0-9]\|epoch [0-9]*/[0-9]*' "$W/$n.log" | tail -1) "; done)"
done

say "4. evaluation on the served readout (last4)"
evalchain() {  # $1 = checkpoint, $2 = dir
  local ck=$1 d=$2 spec proto ds tag
  mkdir -p "$d"
  for spec in "knn fashion-mnist" "linear fashion-mnist" "knn fashion-mnist-shifted" \
    "linear fashion-mnist-shifted" "attentive fashion-mnist"; do
    read -r proto ds <<<"$spec"
    local suffix=${ds#fashion-mnist}; suffix=${suffix#-}; tag=$proto${suffix:+_$suffix}
    [ "$(left)" -lt 20 ] && break
    local f=(--set feature=last4); [ "$proto" = attentive ] && f=(--set tokens=last4)
    timeout $(($(left) - 15)) python3 training/run.py eval --checkpoint "$ck" --protocol "$proto" \
      --dataset "$ds" --device "$DEVICE" --json --cache-dir "$d/cache" "${f[@]}" "${EVAL_SETS[@]}" \
      >"$d/eval_$tag.json" 2>"$d/eval_$tag.log"
  done
}
for r in "${RUNS[@]}"; do
  name=${r%%|*}
  [ -f "$W/$name/final.safetensors" ] && evalchain "$W/$name/final.safetensors" "$W/$name" &
done
evalchain random:fmnist_cae "$W/random" &
wait

say "5. results"
top1() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['top1'])" "$1" 2>/dev/null; }
for f in "$W"/*/eval_*.json "$W"/ft_*.json; do  # "variant/eval_protocol top1", "ft_name top1"
  [ -s "$f" ] && rel=${f#"$W"/} && echo "${rel%.json} $(top1 "$f")"
done | sort | tee "$W/summary.txt"
echo "epochs per stage: $E1 $E2 $E3" >>"$W/summary.txt"
cd "$W" && tar czf "$OUT/results.tar.gz" --exclude='*/cache' --exclude='*.pth' --exclude='*/model.safetensors' \
  --exclude='probe_*' --exclude='*/final.safetensors' . 2>/dev/null
for n in cae_s0 cae_s1; do
  [ -f "$n/final.safetensors" ] && split -b 15M -d "$n/final.safetensors" "$OUT/$n.final.safetensors.part"
done
say "done"
