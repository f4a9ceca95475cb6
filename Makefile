# Two commands do all the set-up on a fresh machine:
#   make train   - trains the default network (downloads CIFAR-10 into ./data unless $CIFAR10_ROOT is set)
#   make test    - lint and the whole test suite
# Each creates the virtual environment it needs on first use.
#   make serve   - then: the web page and API for the newest run (or ARGS="--checkpoint runs/X/best.pt")

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=
# pyproject.toml gives ranges; constraints.txt pins our machines' releases (torch from local disk)
PIP    := $(BIN)/pip install -q -c constraints.txt

.PHONY: train test lint serve clean

$(BIN)/tinycifar: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(BIN)/tinycifar
	$(PIP) -e ".[dev]"
	touch $@

train: $(BIN)/tinycifar
	$(BIN)/tinycifar train --preset fast $(ARGS)

$(VENV)/.serve: $(BIN)/tinycifar
	$(PIP) -e ".[serve]"
	touch $@

NEWEST := $(shell ls -t runs/*/best.pt 2>/dev/null | head -n 1)
serve: $(VENV)/.serve
	@test -n "$(ARGS)$(NEWEST)" || { echo "make serve: no runs/*/best.pt yet: run make train first, or pass ARGS=\"--checkpoint FILE\""; exit 2; }
	$(BIN)/tinycifar serve $(if $(ARGS),$(ARGS),--checkpoint $(NEWEST))

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests benchmarks examples docs

test: lint
	$(BIN)/pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
