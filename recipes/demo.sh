#!/usr/bin/env bash
# The main job on the embedded default, end to end on SmolLM2-135M-Instruct:
#   bash recipes/demo.sh [RUN_DIR]      (make demo runs it with runs/demo)
# init-qat -> train-sft-qat (arithmetic, ~2-3 minutes on 2 cores) -> convert-int4, then the
# held-out accuracy of the INT4 model before and after SFT-QAT on the real 4-bit kernel.
# Each stage writes one artifact folder; re-running skips stages that are up to date, and a
# killed train-sft-qat resumes from its last checkpoint.
set -euo pipefail
RUN=${1:-runs/demo}
DATA=recipes/data

qatctl init-qat smollm2-135m --out "$RUN/init" --group-size 32 --scale-rule kimi
qatctl convert-int4 "$RUN/init" --out "$RUN/init-int4"
qatctl train-sft-qat "$RUN/init" --data "$DATA/arith-train.jsonl" --out "$RUN/sft" \
    --steps 40 --batch-size 8 --micro-batch 8 --lr 5e-5 --warmup-steps 4 --save-every 10
qatctl convert-int4 "$RUN/sft" --out "$RUN/int4"
qatctl accuracy "$RUN/init-int4" --prompts "$DATA/arith-test.jsonl" --limit 64
qatctl accuracy "$RUN/int4" --prompts "$DATA/arith-test.jsonl" --limit 64
