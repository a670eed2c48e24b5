# Two commands on a fresh machine: `make demo` and `make test`.
# Both bootstrap .venv (torch==2.13.0 first, so pip takes the local CPU wheel, then the
# package with its extras) and are quick when everything is already installed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.probunroll-installed
EXTRAS := dev,sklearn,pyro,gpytorch,plot,data,sae
export MPLBACKEND := Agg

.PHONY: demo test test-all lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/probunroll demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check probunroll tests benchmarks examples
	$(BIN)/ruff format --check probunroll tests benchmarks examples

format: $(STAMP)
	$(BIN)/ruff format probunroll tests benchmarks examples
	$(BIN)/ruff check --fix probunroll tests benchmarks examples

bench: $(STAMP)
	$(BIN)/python benchmarks/cg.py

clean:
	rm -rf $(VENV) build dist .pytest_cache probunroll-demo
