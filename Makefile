# Two commands do all the set-up on a fresh machine:
#   make train   - trains the default network (downloads CIFAR-10 into ./data unless $CIFAR10_ROOT is set)
#   make test    - lint and the whole test suite
# Each creates the virtual environment it needs on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: train test lint clean

$(BIN)/tinycifar: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(BIN)/tinycifar
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

train: $(BIN)/tinycifar
	$(BIN)/tinycifar train --preset fast $(ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests benchmarks examples

test: lint
	$(BIN)/pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
