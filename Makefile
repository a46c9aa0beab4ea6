# make sweep and make test set everything up on a fresh machine: a venv made by $(PYTHON) with the
# versions of requirements.lock, remade when $(PYTHON) is another version than the one that made it,
# reinstalled when pyproject.toml or the lock changes.
#
# Python 3.11, 3.12 or 3.13. PYTHON is the python3 on PATH: what the shell calls python3 is what the
# user means, and CI's (3.11); another one is a choice made on the command line, e.g.
# `make sweep PYTHON=python3.13` (a pyenv version installed but not selected is found too).
PYTHONS := 3.11 3.12 3.13
PYTHON ?= python3
# $(PYTHON) as an absolute path and its version, e.g. /root/.pyenv/versions/3.11.7/bin/python3 3.11.7.
PYTHON_INFO := $(shell { $(PYTHON) -c 'import platform, sys; print(sys.executable, platform.python_version())' \
  || PYENV_VERSION=$$(pyenv whence $(PYTHON) | tail -n 1) $(PYTHON) -c 'import platform, sys; print(sys.executable, platform.python_version())'; } 2>/dev/null)
PYTHON_EXE := $(word 1,$(PYTHON_INFO))
PYTHON_VERSION := $(word 2,$(PYTHON_INFO))
# GPU=1: TensorFlow built with CUDA (tensorflow[and-cuda], Linux x86_64 with an NVIDIA driver) instead of
# tensorflow-cpu, in its own venv so that the two never mix: `make install GPU=1`, then e.g. `make sweep GPU=1`.
GPU ?=
VENV ?= $(if $(GPU),.venv-gpu,.venv)
PY := $(VENV)/bin/python
EXTRAS ?= dev,optuna,cluster
comma := ,
# pip constraints: the exact versions of everything installed (`make lock` writes them)
LOCK := requirements.lock
# The stamp names the Python and the extras, so that another one of either installs again.
STAMP := $(VENV)/.installed-$(PYTHON_VERSION)-$(subst $(comma),+,$(EXTRAS))
# The TF-MOT peer runs in its own venv with its own lock: tf-keras pulls the full tensorflow wheel,
# tfmot switches the process to Keras 2 (neither may touch .venv) and needs absl-py 1.x (.venv has 2.x).
PEER_VENV ?= .venv-peers
PEER_PY := $(PEER_VENV)/bin/python
PEER_LOCK := requirements-peers.lock
PEER_STAMP := $(PEER_VENV)/.installed-$(PYTHON_VERSION)-peers

.PHONY: help install run sweep test bench report ui lint clean sensitivity lock check-python

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

# Stops unless $(PYTHON) is one of $(PYTHONS).
define check_python
	@test -n "$(filter $(basename $(PYTHON_VERSION)),$(PYTHONS))" || { echo "make: PYTHON=$(PYTHON) is $(if $(PYTHON_VERSION),Python $(PYTHON_VERSION),not found); this project needs Python $(PYTHONS): e.g. make $(firstword $(MAKECMDGOALS) install) PYTHON=python3.13" >&2; exit 2; }
endef

# $(call venv,DIR,LOCK,EXTRAS): DIR made by $(PYTHON) (a venv of another Python version is removed first),
# the project installed with its EXTRAS at the versions of LOCK; the stamp ($@) is written last.
define venv
	$(check_python)
	@if [ "$$($(1)/bin/python -c 'import platform; print(platform.python_version())' 2>/dev/null)" != "$(PYTHON_VERSION)" ]; then \
	  if [ -e $(1) ] && [ ! -f $(1)/pyvenv.cfg ]; then echo "make: $(1) is not a venv; not touching it" >&2; exit 2; fi; \
	  if [ -e $(1) ]; then echo "$(1) was made by another Python: making it again with $(PYTHON) $(PYTHON_VERSION)"; rm -rf $(1); fi; \
	  echo "$(PYTHON_EXE) -m venv $(1)"; $(PYTHON_EXE) -m venv $(1) && echo '*' > $(1)/.gitignore; \
	fi
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet -c $(2) -e '.[$(3)]'
	rm -f $(1)/.installed*
	touch $@
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call venv,$(VENV),$(LOCK),$(EXTRAS))
	$(if $(GPU),$(PY) -m pip uninstall --quiet -y tensorflow-cpu && $(PY) -m pip install --quiet -c $(LOCK) \
	  "tensorflow[and-cuda]==$$(sed -n 's/^tensorflow-cpu==\([^ ;]*\).*/\1/p' $(LOCK))" || { rm -f $@; exit 1; })

$(PEER_STAMP): pyproject.toml $(PEER_LOCK)
	$(call venv,$(PEER_VENV),$(PEER_LOCK),peers)

install: $(STAMP)  ## create .venv and install the locked versions (when missing, made by another Python, or older than pyproject.toml or the lock)

run: $(STAMP)  ## one job on the defaults (digits, seed_cnn, magnitude 0.5); add ARGS="key=value ..."
	$(PY) -m pipeline.run $(ARGS)

sweep: $(STAMP)  ## the four methods over the default sparsity grid, jobs in parallel on the cores, then the report
	$(PY) -m pipeline.run -m hydra/launcher=workers method=magnitude,filter,slim,hybrid $(ARGS)

# Two pytest workers, each taking whole test files (a module's shared fixtures run once): much of a test's
# time is one thread (process starts, TF tracing, polling a server), so two overlap even on two cores.
TEST_WORKERS ?= 2
test: $(STAMP)  ## the whole test suite on 2 pytest workers (TEST_WORKERS=N for another number, 0 for none)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

bench: $(STAMP) $(PEER_STAMP)  ## benchmarks: shared baseline, overhead, structured speedups, speed vs TF-MOT (prints figures and ratios)
	$(PEER_PY) -m pipeline.peers.tfmot --out benchmarks/peer.json
	$(PY) -m pipeline.peers.ours --out benchmarks/ours.json
	$(PY) -m pipeline.peers.compare --peer benchmarks/peer.json --ours benchmarks/ours.json --out benchmarks/peer.md
	$(PY) -m pipeline.bench $(ARGS)
	$(PY) -m pipeline.bench_cluster $(ARGS)
	$(PY) -m pipeline.bench_models  # ResNet-20 and MobileNetV2 on digits at 32x32: rewrites its section of BENCHMARKS.md
	$(PY) -m pipeline.peers.real  # real data (Fashion-MNIST): rewrites its section of BENCHMARKS.md

sensitivity: $(STAMP)  ## per-layer sensitivity scan for filter pruning (Li et al.); ARGS="model=vgg_bn"
	$(PY) -m pipeline.sensitivity $(ARGS)

report: $(STAMP)  ## the comparison report for an experiment (ARGS="--experiment pruning --out report")
	$(PY) -m pipeline.report $(ARGS)

ui: $(STAMP)  ## the MLflow UI on 127.0.0.1:5000, printing the links to the runs and the newest sweep (ARGS="--experiment NAME --port N --uri URI")
	$(PY) -m pipeline.ui $(ARGS)

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check pipeline tests tools

# The lock files: requirements.lock for .venv (every extra but peers, so an extra added to pyproject.toml
# is locked by `make lock` alone) and requirements-peers.lock for .venv-peers, each resolved for every
# Python of PYTHONS in throwaway venvs (tools/lock.py says how). The current locks constrain the new
# ones: only what pyproject.toml's changes require moves. UPGRADE=1: newest versions the ranges allow.
lock:  ## re-resolve requirements*.lock from pyproject.toml (UPGRADE=1: newest versions in the ranges)
	$(check_python)
	$(PYTHON_EXE) tools/lock.py $(if $(UPGRADE),--upgrade) --python $(PYTHONS) -- \
	  '$(LOCK)=*' '$(PEER_LOCK)=peers'

# Proves $(PYTHON) without touching .venv: its own venv, one smoke job, the config tests.
CHECK_VENV ?= .venv-py$(basename $(PYTHON_VERSION))
CHECK_DIR := $(abspath $(CHECK_VENV))/check
check-python:  ## PYTHON=python3.13: install into .venv-py3.13, run a smoke job and tests/test_config.py
	$(check_python)
	$(MAKE) --no-print-directory install VENV=$(CHECK_VENV)
	rm -rf $(CHECK_DIR) && mkdir -p $(CHECK_DIR)
	$(CHECK_VENV)/bin/python -m pipeline.run training=smoke tracking.uri=sqlite:///$(CHECK_DIR)/mlflow.db \
	  hydra.run.dir=$(CHECK_DIR)/out
	$(CHECK_VENV)/bin/python -m pytest tests/test_config.py -q

clean:  ## remove outputs, multirun folders, reports and caches (keeps .venv and mlruns/)
	rm -rf outputs multirun report .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
