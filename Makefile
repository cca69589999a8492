# Two commands on a fresh Debian/Ubuntu machine with Python >= 3.11 and no GPU:
#   make run    set up .venv and run the whole DAG (smoke profile, embedded default model)
#   make test   set up .venv and run the tests
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup run test lint dag clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

run: setup
	$(BIN)/snakemake --profile workflow/profiles/smoke

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/snakemake --lint

dag: setup
	$(BIN)/snakemake --dag | dot -Tpng > dag.png
