# The INT4-QAT RL loop as Make targets: every target is an artifact's DIR/qatctl.json (or a
# report file), so `make` reruns exactly the stages whose inputs changed.
#
#   make -f recipes/loop.mk RUN=runs/loop                      # the whole loop, one seed
#   make -f recipes/loop.mk RUN=runs/loop -j2 SEEDS="0 1 2"     # arms and seeds side by side
#   make -f recipes/loop.mk RUN=runs/loop -n                    # the qatctl commands it would run
#   make -f recipes/loop.mk RUN=runs/loop -q; echo $$?          # 0: nothing to do
#
# The chain, per seed S and arm A:
#   RUN/init                      init-qat MODEL (one for every seed)
#   RUN/sS/sft-qat, sft-bf16      train-sft-qat on SFT_DATA, fake quant on / off, seed S
#   RUN/sS/sft-*-int4             convert-int4 of each start
#   RUN/sS/A/policy-J, int4-J     rl-step links (J = cumulative iterations, LINKS), convert-int4
#   REPORTS/sS/A/link-J/          accuracy-SPLIT-KIND.json (per problem; KIND int4 or dense),
#                                 rl.json + metrics.jsonl + machine.txt (J > 0),
#                                 consistency.json at the last link (eval-consistency's report)
# Arms: int4-qat (SFT-QAT -> QAT RL, INT4 rollouts), bf16 (SFT-BF16 -> BF16 RL, BF16 rollouts;
# its INT4 scores are the bf16-then-ptq arm), int4-ptq (SFT-BF16 -> BF16 training, INT4 rollouts),
# and, asked for by name (not in the default ARMS), int4-qat-exact: int4-qat with --true-on-policy,
# from the same start and seed (its link 0 is int4-qat's, copied).
#
# What makes a target stale: its input artifacts' manifests, the data files it reads, and this
# file's variables for its stage, kept in RUN/.vars/STAGE (rewritten only when they change, when
# the makefile is read: also under -n and -q). Stages get --force, which replaces only an output
# made from other inputs or config: an input touched without a change prints "up to date" and
# touches the manifest. A killed target resumes through the stage's own resume state
# (DIR.partial/); a failed one leaves no newer manifest, so Make still sees it stale. Scoring
# waits (order-only) for its arm's last RL link, so `make -j` keeps the RL chains, the long pole,
# busy first; asking for one report builds its arm's chain.

QATCTL      ?= qatctl
PYTHON      ?= python3
MODEL       ?= smollm2-135m
RUN         ?= runs/loop
REPORTS     ?= $(RUN)/reports
SFT_DATA    ?= recipes/data/arith-train.jsonl
RL_PROMPTS  ?= recipes/data/arith-train.jsonl
EVAL        ?= recipes/data/arith-%.jsonl
SPLITS      ?= val test test-oot
SPLITS_MID  ?= $(SPLITS)
KINDS       ?= int4 dense
ARMS        ?= int4-qat bf16 int4-ptq
SEEDS       ?= 0
ITERATIONS  ?= 20
EVERY       ?= 10
LINKS       ?= $(shell seq $(EVERY) $(EVERY) $(ITERATIONS))
THREADS     ?= 1
GROUP_SIZE  ?= 32
SCALE_RULE  ?= kimi
SAMPLES     ?= 8
INIT_FLAGS  ?=
SFT_FLAGS   ?= --steps 40 --batch-size 8 --micro-batch 8 --lr 5e-5 --warmup-steps 4 --save-every 10 --compute-dtype fp32
RL_FLAGS    ?= --prompts-per-step 16 --mini-batches 1 --max-new-tokens 24 --lr 1e-5 --prompt-order shuffle --compute-dtype fp32 --save-every 5
ACC_FLAGS   ?=
CONSISTENCY_FLAGS ?= --limit 16 --samples-per-prompt 4 --max-new-tokens 24
CONSISTENCY ?= 1

# ---------------------------------------------------------------- checks, before anything runs
_num = $(shell echo '$1' | grep -qxE '[0-9]+' && echo ok)
$(foreach a,$(ARMS),$(if $(filter $a,int4-qat int4-ptq bf16 int4-qat-exact),,$(error ARMS: '$a' is not int4-qat, int4-ptq, bf16 or int4-qat-exact)))
$(foreach v,SEEDS LINKS THREADS SAMPLES GROUP_SIZE,$(foreach n,$($v),$(if $(call _num,$n),,$(error $v: '$n' is not a whole number))))
$(if $(strip $(LINKS)),,$(error LINKS is empty (ITERATIONS $(ITERATIONS), EVERY $(EVERY))))
$(if $(filter 0,$(THREADS)),$(error THREADS: must be >= 1))
$(if $(filter 0,$(firstword $(LINKS))),$(error LINKS: start after 0 (link 0 is the SFT start)))
$(if $(findstring %,$(EVAL)),,$(error EVAL: '$(EVAL)' needs a % for the split name))

# ---------------------------------------------------------------- variables of each stage
VARS := $(RUN)/.vars
$(shell mkdir -p $(VARS))
_stamp = $(if $(subst x$(file <$(VARS)/$1),,x$2),$(file >$(VARS)/$1,$2))
$(call _stamp,init,$(MODEL) --group-size $(GROUP_SIZE) --scale-rule $(SCALE_RULE) $(INIT_FLAGS))
$(call _stamp,sft,$(SFT_DATA) $(SFT_FLAGS))
$(call _stamp,rl,$(RL_PROMPTS) --samples-per-prompt $(SAMPLES) $(RL_FLAGS))
$(call _stamp,acc,$(EVAL) $(ACC_FLAGS))
$(call _stamp,consistency,$(EVAL) $(CONSISTENCY_FLAGS))

Q = OMP_NUM_THREADS=$(THREADS) $(QATCTL)
.DELETE_ON_ERROR:
.SUFFIXES:

# ---------------------------------------------------------------- paths
start_of  = $(if $(filter int4-qat int4-qat-exact,$1),sft-qat,sft-bf16)
arm_flags = $(if $(filter int4-ptq,$1),--no-fake-quant,$(if $(filter bf16,$1),--rollout-precision bf16,$(if $(filter int4-qat-exact,$1),--true-on-policy)))
policy    = $(if $(filter 0,$3),$(RUN)/s$1/$(call start_of,$2),$(RUN)/s$1/$2/policy-$3)
int4      = $(if $(filter 0,$3),$(RUN)/s$1/$(call start_of,$2)-int4,$(RUN)/s$1/$2/int4-$3)
model_of  = $(if $(filter int4,$4),$(call int4,$1,$2,$3),$(call policy,$1,$2,$3))
split_file = $(subst %,$1,$(EVAL))
report    = $(REPORTS)/s$1/$2/link-$3
LAST     := $(lastword $(LINKS))
splits_at = $(if $(filter 0 $(LAST),$1),$(SPLITS),$(SPLITS_MID))

ALL :=

$(RUN)/init/qatctl.json: $(VARS)/init
	$(Q) init-qat $(MODEL) --out $(RUN)/init --group-size $(GROUP_SIZE) --scale-rule $(SCALE_RULE) $(INIT_FLAGS) --force

define sft_rules  # seed
$(RUN)/s$1/sft-qat/qatctl.json: $(RUN)/init/qatctl.json $(SFT_DATA) $(VARS)/sft
	$$(Q) train-sft-qat $(RUN)/init --data $(SFT_DATA) --out $(RUN)/s$1/sft-qat --seed $1 $(SFT_FLAGS) --force
$(RUN)/s$1/sft-bf16/qatctl.json: $(RUN)/init/qatctl.json $(SFT_DATA) $(VARS)/sft
	$$(Q) train-sft-qat $(RUN)/init --data $(SFT_DATA) --out $(RUN)/s$1/sft-bf16 --seed $1 --no-fake-quant $(SFT_FLAGS) --force
$(RUN)/s$1/sft-qat-int4/qatctl.json: $(RUN)/s$1/sft-qat/qatctl.json
	$$(Q) convert-int4 $(RUN)/s$1/sft-qat --out $(RUN)/s$1/sft-qat-int4 --force
$(RUN)/s$1/sft-bf16-int4/qatctl.json: $(RUN)/s$1/sft-bf16/qatctl.json
	$$(Q) convert-int4 $(RUN)/s$1/sft-bf16 --out $(RUN)/s$1/sft-bf16-int4 --force
endef

define link_rules  # seed arm prev j: rl-step from link prev to link j, its conversion and records
$(call policy,$1,$2,$4)/qatctl.json: $(call policy,$1,$2,$3)/qatctl.json $(RL_PROMPTS) $(VARS)/rl
	$$(Q) rl-step $(call policy,$1,$2,$3) --prompts $(RL_PROMPTS) --out $(call policy,$1,$2,$4) --iterations $(shell expr $4 - $3) --samples-per-prompt $(SAMPLES) --seed $1 $(if $(filter 0,$3),--reset-optimizer) $(call arm_flags,$2) $(RL_FLAGS) --force
$(call int4,$1,$2,$4)/qatctl.json: $(call policy,$1,$2,$4)/qatctl.json
	$$(Q) convert-int4 $(call policy,$1,$2,$4) --out $(call int4,$1,$2,$4) --force
$(call report,$1,$2,$4)/rl.json: $(call policy,$1,$2,$4)/qatctl.json
	@mkdir -p $$(@D)
	cp $(call policy,$1,$2,$4)/metrics.jsonl $$(@D)/metrics.jsonl
	$(PYTHON) -c "import json,sys; m=json.load(open(sys.argv[1])); json.dump({k: m[k] for k in ('config','inputs','metrics','rl','created','qatctl_version')}, open(sys.argv[2],'w'), indent=1)" $$< $$@.tmp
	{ grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed "s/^ //"; nproc --all; echo "OMP_NUM_THREADS=$(THREADS)"; echo "qatctl $$$$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"; } > $$(@D)/machine.txt
	mv $$@.tmp $$@
ALL += $(call report,$1,$2,$4)/rl.json
endef

define acc_rule  # seed arm j split kind (after the arm's RL chain: under -j the long pole runs first)
$(call report,$1,$2,$3)/accuracy-$4-$5.json: $(call model_of,$1,$2,$3,$5)/qatctl.json $(call split_file,$4) $(VARS)/acc | $(call policy,$1,$2,$(LAST))/qatctl.json
	@mkdir -p $$(@D)
	$$(Q) accuracy $(call model_of,$1,$2,$3,$5) --prompts $(call split_file,$4) $(ACC_FLAGS) --json > $$@.tmp
	mv $$@.tmp $$@
ALL += $(call report,$1,$2,$3)/accuracy-$4-$5.json
endef

define acc_copy  # seed split kind arm from: an arm that starts where another does has its link 0, scored once
$(call report,$1,$4,0)/accuracy-$2-$3.json: $(call report,$1,$5,0)/accuracy-$2-$3.json
	@mkdir -p $$(@D)
	cp $$< $$@
ALL += $(call report,$1,$4,0)/accuracy-$2-$3.json
endef
# int4-ptq's link 0 is bf16's; int4-qat-exact's is int4-qat's (built with it, or already in REPORTS)
copy_from = $(if $(filter 0,$3),$(if $(and $(filter int4-ptq,$2),$(filter bf16,$(ARMS))),bf16,$(if $(and $(filter int4-qat-exact,$2),$(or $(filter int4-qat,$(ARMS)),$(wildcard $(call report,$1,int4-qat,0)/accuracy-$4-$5.json))),int4-qat)))
acc_of = $(if $(call copy_from,$1,$2,$3,$4,$5),$(call acc_copy,$1,$4,$5,$2,$(call copy_from,$1,$2,$3,$4,$5)),$(call acc_rule,$1,$2,$3,$4,$5))

define consistency_rule  # seed arm j
$(call policy,$1,$2,$3)-consistency/qatctl.json: $(call policy,$1,$2,$3)/qatctl.json $(if $(filter bf16,$2),,$(call int4,$1,$2,$3)/qatctl.json) $(call split_file,val) $(VARS)/consistency
	$$(Q) eval-consistency $(call policy,$1,$2,$3) $(if $(filter bf16,$2),$(call policy,$1,$2,$3),$(call int4,$1,$2,$3)) --prompts $(call split_file,val) --out $(call policy,$1,$2,$3)-consistency --seed $1 $(CONSISTENCY_FLAGS) --force
$(call report,$1,$2,$3)/consistency.json: $(call policy,$1,$2,$3)-consistency/qatctl.json
	@mkdir -p $$(@D)
	cp $(call policy,$1,$2,$3)-consistency/report.json $$@
ALL += $(call report,$1,$2,$3)/consistency.json
endef

# chain SEED ARM PREV "J..." : the rules of each link after PREV
chain = $(if $(strip $4),$(eval $(call link_rules,$1,$2,$3,$(firstword $4)))$(call chain,$1,$2,$(firstword $4),$(wordlist 2,9999,$4)))

$(foreach s,$(SEEDS),$(eval $(call sft_rules,$s)))
$(foreach s,$(SEEDS),$(foreach a,$(ARMS),$(call chain,$s,$a,0,$(LINKS))))
$(foreach s,$(SEEDS),$(foreach a,$(ARMS),$(foreach j,0 $(LINKS),$(foreach p,$(call splits_at,$j),$(foreach k,$(KINDS),\
  $(eval $(call acc_of,$s,$a,$j,$p,$k)))))))
$(if $(filter 1,$(CONSISTENCY)),$(foreach s,$(SEEDS),$(foreach a,$(ARMS),$(eval $(call consistency_rule,$s,$a,$(LAST))))))

.DEFAULT_GOAL := all
.PHONY: all
all: $(ALL)
