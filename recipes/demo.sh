#!/usr/bin/env bash
# The main job on the embedded default, end to end on SmolLM2-135M-Instruct:
#   bash recipes/demo.sh [RUN_DIR]      (make demo runs it with runs/demo)
# Each stage writes one artifact folder; re-running skips stages that are up to date.
set -euo pipefail
RUN=${1:-runs/demo}

qatctl init-qat smollm2-135m --out "$RUN/init" --group-size 32 --scale-rule kimi
qatctl convert-int4 "$RUN/init" --out "$RUN/int4"
qatctl inspect "$RUN/int4"
