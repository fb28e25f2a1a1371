#!/usr/bin/env bash
# K iterations of the QAT -> INT4 -> RL loop on the arithmetic prompts:
#   bash recipes/rl-loop.sh RUN_DIR START_POLICY [K] [extra rl-step flags...]
#   bash recipes/rl-loop.sh runs/rl-qat runs/demo/sft 20
#   bash recipes/rl-loop.sh runs/rl-ptq runs/demo/sft 20 --no-fake-quant   # BF16-train + INT4 PTQ rollouts
# Policy i is converted to INT4 (int4-i), rolled out and updated into policy i+1. Re-running
# skips every complete step (each stage is up to date), so a killed loop resumes where it was.
set -euo pipefail
RUN=$1; START=$2; K=${3:-20}; shift $(( $# < 3 ? $# : 3 ))
PROMPTS=recipes/data/arith-train.jsonl
TEST=recipes/data/arith-test.jsonl
mkdir -p "$RUN"
[ -e "$RUN/policy-0" ] || ln -s "$(realpath "$START")" "$RUN/policy-0"

for i in $(seq 0 $((K - 1))); do
  qatctl convert-int4 "$RUN/policy-$i" --out "$RUN/int4-$i"
  qatctl rl-step "$RUN/policy-$i" --rollout-model "$RUN/int4-$i" --prompts "$PROMPTS" --out "$RUN/policy-$((i + 1))" \
      --prompts-per-step 8 --samples-per-prompt 4 --max-new-tokens 24 --lr 2e-6 "$@"
done
qatctl convert-int4 "$RUN/policy-$K" --out "$RUN/int4-$K"
qatctl accuracy "$RUN/int4-0" --prompts "$TEST" --limit 100 --json > "$RUN/accuracy-before.json"
qatctl accuracy "$RUN/int4-$K" --prompts "$TEST" --limit 100 --json > "$RUN/accuracy-after.json"
qatctl plot "$RUN"
