# make sweep and make test set everything up on a fresh machine (Python 3.11 on PATH as python3).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL := 3
export TF_ENABLE_ONEDNN_OPTS := 0

.PHONY: help install run sweep test bench report ui lint clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the pinned dependencies (when missing or older than pyproject.toml)

run: $(STAMP)  ## one job on the defaults (digits, seed_cnn, magnitude 0.5); add ARGS="key=value ..."
	$(PY) -m pipeline.run $(ARGS)

sweep: $(STAMP)  ## the four methods over the default sparsity grid, then the report
	$(PY) -m pipeline.run -m method=magnitude,filter,slim,hybrid $(ARGS)

test: $(STAMP)  ## the whole test suite
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)  ## benchmarks: shared baseline, overhead, structured speedups (prints figures and ratios)
	$(PY) -m pipeline.bench $(ARGS)

report: $(STAMP)  ## the comparison report for an experiment (ARGS="--experiment pruning --out report")
	$(PY) -m pipeline.report $(ARGS)

ui: $(STAMP)  ## the MLflow UI on http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check pipeline tests

clean:  ## remove outputs, multirun folders, reports and caches (keeps .venv and mlruns/)
	rm -rf outputs multirun report .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
