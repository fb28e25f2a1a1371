#!/usr/bin/env bash
# The whole loop on the embedded default, end to end on SmolLM2-135M-Instruct:
#   bash recipes/demo.sh [RUN_DIR]      (make demo runs it with runs/demo)
# init-qat -> train-sft-qat (arithmetic, fake INT4) -> convert-int4 -> rl-step --iterations 4
# (GRPO, INT4 rollouts, in-memory weight sync) -> convert-int4, then greedy held-out accuracy of
# the INT4 model before SFT, after SFT and after RL on the real 4-bit kernel, and the RL policy
# as a llama.cpp GGUF (convert-int4 --format gguf). Each stage writes
# one artifact folder; re-running skips stages that are up to date, and a killed train-sft-qat
# or rl-step resumes from its last saved state.
set -euo pipefail
RUN=${1:-runs/demo}
DATA=recipes/data

qatctl init-qat smollm2-135m --out "$RUN/init" --group-size 32 --scale-rule kimi
qatctl convert-int4 "$RUN/init" --out "$RUN/init-int4"
qatctl train-sft-qat "$RUN/init" --data "$DATA/arith-train.jsonl" --out "$RUN/sft" \
    --steps 40 --batch-size 8 --micro-batch 8 --lr 5e-5 --warmup-steps 4 --save-every 10
qatctl convert-int4 "$RUN/sft" --out "$RUN/int4"
qatctl rl-step "$RUN/sft" --prompts "$DATA/arith-train.jsonl" --out "$RUN/rl" --iterations 4 \
    --prompts-per-step 8 --samples-per-prompt 8 --max-new-tokens 24 --lr 1e-5 --reset-optimizer --save-every 2
qatctl convert-int4 "$RUN/rl" --out "$RUN/rl-int4"
for m in init-int4 int4 rl-int4; do
  qatctl accuracy "$RUN/$m" --prompts "$DATA/arith-test.jsonl" --limit 64 --json > "$RUN/accuracy-$m.json"
done
qatctl plot "$RUN/rl" --out "$RUN/rl-metrics.png"
qatctl convert-int4 "$RUN/rl" --format gguf --out "$RUN/gguf"  # the same INT4 weights for llama.cpp (~15 s)
python recipes/summary.py "$RUN"
echo
echo "llama.cpp / Ollama: $RUN/gguf/model.gguf (Q4_0 blocks of the QAT policy's own codes and scales)"
echo "  llama-cli -m $RUN/gguf/model.gguf -cnv -p 'What is 12 + 7?'      (Ollama Modelfile: FROM ./$RUN/gguf/model.gguf)"
