#!/usr/bin/env bash
# One RL arm at length, as a chain of rl-step artifacts with held-out accuracy at each link:
#   bash recipes/rl-chain.sh OUT_DIR START_POLICY ARM SEED "20 40 70 115" [extra rl-step flags...]
#   bash recipes/rl-chain.sh runs/long/int4-qat-s0 runs/demo/sft int4-qat 0 "40 80 115" --device cuda
# ARM: int4-qat | int4-ptq | bf16 (the seed's three arms, one flag apart). Writes OUT_DIR/policy-J (the
# policy after J iterations; fp32 masters and AdamW carried from link to link in trainer_state/),
# OUT_DIR/int4-J and OUT_DIR/accuracy-J.json (greedy, recipes/data/arith-test.jsonl, 200 problems).
# GRPO settings are docs/results.md's long runs: 16 informative groups x 8 samples per iteration,
# 2 optimizer steps per iteration, lr 1e-5, 24 new tokens. Extra flags go to every rl-step (the last
# of a repeated flag wins). Re-running skips finished links; a killed link resumes (--save-every).
set -euo pipefail
OUT=$1; START=$2; ARM=$3; SEED=$4; LINKS=$5; shift 5
source "$(dirname "$0")/arm-flags.sh"
arm_flags "$ARM"
DEVICE=auto
for ((i = 1; i <= $#; i++)); do [ "${!i}" = --device ] && { n=$((i + 1)); DEVICE=${!n}; }; done
mkdir -p "$OUT"
[ -e "$OUT/policy-0" ] || ln -s "$(realpath "$START")" "$OUT/policy-0"
prev=0
for j in $LINKS; do
  fresh=(); [ "$prev" -eq 0 ] && fresh=(--reset-optimizer)
  [ -f "$OUT/policy-$j/qatctl.json" ] ||
    qatctl rl-step "$OUT/policy-$prev" --prompts recipes/data/arith-train.jsonl --out "$OUT/policy-$j" \
      --iterations $((j - prev)) --prompts-per-step 16 --samples-per-prompt 8 --mini-batches 2 --max-new-tokens 24 \
      --lr 1e-5 --seed "$SEED" "${fresh[@]}" "${flags[@]}" "$@"
  [ -f "$OUT/int4-$j/qatctl.json" ] || qatctl convert-int4 "$OUT/policy-$j" --out "$OUT/int4-$j"
  if [ ! -s "$OUT/accuracy-$j.json" ]; then
    qatctl accuracy "$OUT/int4-$j" --prompts recipes/data/arith-test.jsonl --device "$DEVICE" --json > "$OUT/accuracy-$j.json.tmp"
    mv "$OUT/accuracy-$j.json.tmp" "$OUT/accuracy-$j.json"
  fi
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'iteration', sys.argv[3], 'held-out', d['correct'], '/', d['total'])" \
    "$OUT/accuracy-$j.json" "$OUT" "$j"
  prev=$j
done
