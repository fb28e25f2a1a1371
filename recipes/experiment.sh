#!/usr/bin/env bash
# The seeds' comparison as a chain of artifacts: four arms from two SFT starts, equal lengths,
# one seed per call, scored at every link on val / test / test-oot, INT4 and dense.
#   bash recipes/experiment.sh RUN_ROOT RESULTS_ROOT SEED ARM "10 20 40 70"
#   bash recipes/experiment.sh runs/exp results/exp 0 int4-qat "10 20 30 40 50 60 70"
# ARM: int4-qat (SFT-QAT -> QAT RL, INT4 rollouts), bf16 (SFT-BF16 -> BF16 RL, BF16 rollouts; its
# INT4 conversions at each link are the bf16-then-ptq arm), int4-ptq (SFT-BF16 -> BF16 training,
# INT4 rollouts of its PTQ conversion).
# Large artifacts stay in RUN_ROOT (not in git): RUN_ROOT/init (one init-qat for every run),
# RUN_ROOT/sSEED/sft-{qat,bf16}, RUN_ROOT/sSEED/ARM/policy-J and int4-J. The small records go to
# RESULTS_ROOT/sSEED/ARM/link-J/ (committed): metrics.jsonl, rl.json (the rl-step manifest's config,
# metrics and inputs), accuracy-{val,test,test-oot}-{int4,dense}.json (per-problem), machine.txt.
# Every step is skipped when its output is complete; a killed rl-step resumes (--save-every 5).
# One thread per run (OMP_NUM_THREADS=1 unless set), fp32 compute: the same kernel, compute dtype
# and thread count from a run's first iteration to its last.
set -euo pipefail
RUN=$1; RES=$2; SEED=$3; ARM=$4; LINKS=$5; shift 5
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=recipes/data
SPLITS="val test test-oot"
source "$(dirname "$0")/arm-flags.sh"
arm_flags "$ARM"
case $ARM in int4-qat) start=sft-qat; sft_flags=() ;; *) start=sft-bf16; sft_flags=(--no-fake-quant) ;; esac

[ -f "$RUN/init/qatctl.json" ] || qatctl init-qat smollm2-135m --out "$RUN/init" --group-size 32 --scale-rule kimi
S="$RUN/s$SEED"
[ -f "$S/$start/qatctl.json" ] ||
  qatctl train-sft-qat "$RUN/init" --data "$DATA/arith-train.jsonl" --out "$S/$start" --steps 40 --batch-size 8 \
    --micro-batch 8 --lr 5e-5 --warmup-steps 4 --save-every 10 --seed "$SEED" --compute-dtype fp32 "${sft_flags[@]}"

score() {  # score MODEL LINK_DIR KIND: greedy accuracy on every split, written atomically
  for split in $SPLITS; do
    local f="$2/accuracy-$split-$3.json"
    [ -s "$f" ] || { qatctl accuracy "$1" --prompts "$DATA/arith-$split.jsonl" --json > "$f.tmp" && mv "$f.tmp" "$f"; }
  done
}

A="$S/$ARM"
mkdir -p "$A"
[ -e "$A/policy-0" ] || ln -s "$(realpath "$S/$start")" "$A/policy-0"
prev=0
for j in 0 $LINKS; do
  L="$RES/s$SEED/$ARM/link-$j"
  mkdir -p "$L"
  if [ "$j" -gt 0 ] && [ ! -f "$A/policy-$j/qatctl.json" ]; then
    fresh=(); [ "$prev" -eq 0 ] && fresh=(--reset-optimizer)
    qatctl rl-step "$A/policy-$prev" --prompts "$DATA/arith-train.jsonl" --out "$A/policy-$j" \
      --iterations $((j - prev)) --prompts-per-step 16 --samples-per-prompt 8 --mini-batches 2 --max-new-tokens 24 \
      --lr 1e-5 --seed "$SEED" --prompt-order shuffle --compute-dtype fp32 --save-every 5 \
      "${fresh[@]}" "${flags[@]}" "$@"
  fi
  if [ "$j" -gt 0 ] && [ ! -s "$L/rl.json" ]; then
    cp "$A/policy-$j/metrics.jsonl" "$L/metrics.jsonl"
    python3 -c "import json,sys; m=json.load(open(sys.argv[1])); json.dump({k: m[k] for k in ('config','inputs','metrics','rl','created','qatctl_version')}, open(sys.argv[2],'w'), indent=1)" \
      "$A/policy-$j/qatctl.json" "$L/rl.json"
  fi
  [ -f "$A/int4-$j/qatctl.json" ] || qatctl convert-int4 "$A/policy-$j" --out "$A/int4-$j"
  score "$A/int4-$j" "$L" int4
  score "$A/policy-$j" "$L" dense
  [ -s "$L/machine.txt" ] || { grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed "s/^ //"; nproc --all;
                               echo "OMP_NUM_THREADS=$OMP_NUM_THREADS";
                               echo "qatctl $(git -C "$(dirname "$0")/.." rev-parse --short HEAD 2>/dev/null || echo unknown)"; } > "$L/machine.txt"
  echo "$RES/s$SEED/$ARM link $j: $(python3 -c "import json,sys; print(' '.join(f\"{s}={json.load(open(sys.argv[1]+f'/accuracy-{s}-int4.json'))['correct']}\" for s in sys.argv[2:]))" "$L" $SPLITS)"
  prev=$j
done
