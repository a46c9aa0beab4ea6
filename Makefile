# make sweep and make test set everything up on a fresh machine (Python 3.11 on PATH as python3).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The TF-MOT peer runs in its own venv: tf-keras pulls the full tensorflow wheel and tfmot switches
# the process to Keras 2, neither of which may touch .venv.
PEER_VENV := .venv-peers
PEER_PY := $(PEER_VENV)/bin/python
PEER_STAMP := $(PEER_VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL := 3
export TF_ENABLE_ONEDNN_OPTS := 0

.PHONY: help install run sweep test bench report ui lint clean sensitivity

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(PEER_STAMP): pyproject.toml
	test -x $(PEER_PY) || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_PY) -m pip install --quiet --upgrade pip
	$(PEER_PY) -m pip install --quiet -e '.[peers]'
	touch $(PEER_STAMP)

install: $(STAMP)  ## create .venv and install the pinned dependencies (when missing or older than pyproject.toml)

run: $(STAMP)  ## one job on the defaults (digits, seed_cnn, magnitude 0.5); add ARGS="key=value ..."
	$(PY) -m pipeline.run $(ARGS)

sweep: $(STAMP)  ## the four methods over the default sparsity grid, then the report
	$(PY) -m pipeline.run -m method=magnitude,filter,slim,hybrid $(ARGS)

test: $(STAMP)  ## the whole test suite
	$(PY) -m pytest $(ARGS)

bench: $(STAMP) $(PEER_STAMP)  ## benchmarks: shared baseline, overhead, structured speedups (prints figures and ratios)
	$(PEER_PY) -m pipeline.peers.tfmot --out benchmarks/peer.json
	$(PY) -m pipeline.peers.ours --out benchmarks/ours.json
	$(PY) -m pipeline.peers.compare --peer benchmarks/peer.json --ours benchmarks/ours.json --out benchmarks/peer.md
	$(PY) -m pipeline.bench $(ARGS)

sensitivity: $(STAMP)  ## per-layer sensitivity scan for filter pruning (Li et al.); ARGS="model=vgg_bn"
	$(PY) -m pipeline.sensitivity $(ARGS)

report: $(STAMP)  ## the comparison report for an experiment (ARGS="--experiment pruning --out report")
	$(PY) -m pipeline.report $(ARGS)

ui: $(STAMP)  ## the MLflow UI on http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check pipeline tests

clean:  ## remove outputs, multirun folders, reports and caches (keeps .venv and mlruns/)
	rm -rf outputs multirun report .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
