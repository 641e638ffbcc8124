# Two entry points for a fresh machine (see README.md):
#   make demo   set up .venv, then run the main job (a 3-site federated simulation) on synthetic data
#   make test   set up .venv, then run the test suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/qanafed sim --config simulations/demo.yaml --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m bench.data_pipeline
	$(BIN)/python -m bench.qana_akida

clean:
	rm -rf $(VENV) runs .pytest_cache
