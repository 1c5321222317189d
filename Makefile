# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-all test-fast bench docs lint clean venv lab

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-install whenever pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[$*]"
	touch $@

venv: $(VENV)/.installed-dev

demo: $(VENV)/.installed-dev
	$(BIN)/python -m rl2fx.train --config-name demo

# The default profile: light hypothesis settings, slow tests deselected, notebooks executed.
test: $(VENV)/.installed-dev
	$(BIN)/lint-imports
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -m "not slow" -q tests rl2fx
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then $(BIN)/python -m pytest -q -p no:cacheprovider --nbmake notebooks; fi

# Everything, with exhaustive hypothesis runs.
test-all: $(VENV)/.installed-dev
	$(BIN)/lint-imports
	HYPOTHESIS_PROFILE=slow $(BIN)/python -m pytest -q tests rl2fx
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then $(BIN)/python -m pytest -q --nbmake notebooks; fi

# JSON results go to outputs/benchmarks/; BENCH_OUT=benchmarks/results rewrites the committed ones.
BENCH_OUT ?= outputs/benchmarks
bench: $(VENV)/.installed-dev $(VENV)/.installed-bench
	@for b in benchmarks/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b --out $(BENCH_OUT) || exit 1; done

# JupyterLab on the notebooks (the `notebook` extra; `make test` only executes them).
lab: $(VENV)/.installed-dev,notebook
	$(BIN)/jupyter lab notebooks/

docs: $(VENV)/.installed-dev
	$(BIN)/mkdocs build --strict

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check rl2fx tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
