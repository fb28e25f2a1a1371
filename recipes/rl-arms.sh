#!/usr/bin/env bash
# The seed's three RL arms from one SFT-QAT policy, one flag apart, same prompts and seeds:
#   bash recipes/rl-arms.sh RUN_DIR START_POLICY SEED [K] [extra rl-step flags...]
#   bash recipes/rl-arms.sh runs/rl3 runs/demo/sft 0 20
# Writes RUN_DIR/{int4-qat,int4-ptq,bf16}-sSEED (policy N+K each, with metrics.jsonl), their INT4
# conversions and held-out greedy accuracy (arith-test.jsonl, 200 problems). Re-running skips
# complete outputs; a killed arm resumes from its last --save-every state.
set -euo pipefail
RUN=$1; START=$2; SEED=$3; K=${4:-20}; shift $(( $# < 4 ? $# : 4 ))
PROMPTS=recipes/data/arith-train.jsonl
TEST=recipes/data/arith-test.jsonl
COMMON=(--prompts "$PROMPTS" --iterations "$K" --prompts-per-step 8 --samples-per-prompt 8 --max-new-tokens 24
        --lr 1e-5 --seed "$SEED" --save-every 5 --reset-optimizer)
source "$(dirname "$0")/arm-flags.sh"
for arm in int4-qat int4-ptq bf16; do
  arm_flags "$arm"
  out="$RUN/$arm-s$SEED"
  qatctl rl-step "$START" --out "$out" "${COMMON[@]}" "${flags[@]}" "$@"
  qatctl convert-int4 "$out" --out "$out-int4"
  qatctl accuracy "$out-int4" --prompts "$TEST" --json > "$out-accuracy.json"
done
