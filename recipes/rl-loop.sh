#!/usr/bin/env bash
# K GRPO iterations of the QAT -> INT4 -> RL loop, as chained artifacts of C iterations each:
#   bash recipes/rl-loop.sh RUN_DIR START_POLICY [K] [C] [extra rl-step flags...]
#   bash recipes/rl-loop.sh runs/rl-qat runs/demo/sft 20 5
#   bash recipes/rl-loop.sh runs/rl-ptq runs/demo/sft 20 5 --no-fake-quant   # BF16 train + INT4 PTQ rollouts
# policy-i -> policy-(i+C) is one rl-step --iterations C (in-memory INT4 weight sync inside it);
# each output carries its fp32 masters and AdamW state (trainer_state/, 1.6 GB for SmolLM2), so
# the next link continues exactly where the last stopped. Re-running skips complete links and a
# killed link resumes from its last saved iteration.
set -euo pipefail
RUN=$1; START=$2; K=${3:-20}; C=${4:-5}; shift $(( $# < 4 ? $# : 4 ))
PROMPTS=recipes/data/arith-train.jsonl
TEST=recipes/data/arith-test.jsonl
mkdir -p "$RUN"
[ -e "$RUN/policy-0" ] || ln -s "$(realpath "$START")" "$RUN/policy-0"

for ((i = 0; i < K; i += C)); do
  n=$(( i + C < K ? C : K - i ))
  fresh=(); [ "$i" -eq 0 ] && fresh=(--reset-optimizer)  # RL starts its own AdamW; later links continue it
  qatctl rl-step "$RUN/policy-$i" --prompts "$PROMPTS" --out "$RUN/policy-$((i + n))" --iterations "$n" \
      --prompts-per-step 8 --samples-per-prompt 8 --max-new-tokens 24 --lr 1e-5 --save-every 1 "${fresh[@]}" "$@"
done
qatctl convert-int4 "$RUN/policy-0" --out "$RUN/int4-0"
qatctl convert-int4 "$RUN/policy-$K" --out "$RUN/int4-$K"
qatctl accuracy "$RUN/int4-0" --prompts "$TEST" --json > "$RUN/accuracy-before.json"
qatctl accuracy "$RUN/int4-$K" --prompts "$TEST" --json > "$RUN/accuracy-after.json"
qatctl plot "$RUN"
