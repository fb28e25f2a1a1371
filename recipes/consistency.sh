#!/usr/bin/env bash
# The QAT x rollout-precision ablation on SmolLM2 after SFT-QAT (run `make demo` first):
#   bash recipes/consistency.sh [RUN_DIR]
# {train view fake-int4, bf16} x {rollout int4, bf16} + the engine floor, report in RUN/ablation.
set -euo pipefail
RUN=${1:-runs/demo}
qatctl eval-consistency "$RUN/sft" --ablation --prompts recipes/data/arith-test.jsonl --out "$RUN/ablation" \
    --limit 32 --max-new-tokens 32
qatctl eval-consistency "$RUN/sft" "$RUN/int4" --prompts recipes/data/arith-test.jsonl --out "$RUN/consistency" \
    --limit 32 --max-new-tokens 32 --max-abs-diff 0.05
