# `make test` and `make train` are the whole quick start: the first call creates .venv/ and installs the project.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LOCK := requirements.lock
ARGS ?=

.PHONY: help install lock test test-fast lint train sweep ui bench clean

help:
	@echo "make train   train ResNet-19 on MNIST (GPUs: 'seed' preset under torchrun on all of them; else 'cpu')"
	@echo "make sweep   Ray Tune + Optuna sweep of v_th/aa (GPUs: sweeps/vth_aa.yaml; else sweeps/smoke.yaml)"
	@echo "             run again: a new sweep (smoke-2, ...); ARGS=--resume continues the latest, ARGS='--resume smoke-2' that one"
	@echo "             ARGS='--metric val_acc,sops_per_image': accuracy against synaptic operations (the Pareto front)"
	@echo "make ui      MLflow UI on the local store (mlflow.db)"
	@echo "make test    the whole test suite;  make test-fast   without the tests marked slow"
	@echo "make lint    ruff check and ruff format --check;  make bench   CPU benchmarks"
	@echo "make install the .venv, pinned by requirements.lock;  make lock   re-resolve and re-pin it"

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Re-resolve pyproject.toml's ranges in a scratch venv and pin what that installs (commit the new lock).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	{ sed -n '1,2p' $(LOCK); .lock-venv/bin/python -m pip freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv

# Four pytest-xdist workers on 2 cores: many tests wait on servers, Ray, SLURM and subprocesses; the tests that
# share a costly module fixture stay in one worker (tests/conftest.py, ONE_WORKER).
XDIST := -n 4 --dist loadgroup

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) --durations=30

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(XDIST)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

train: $(STAMP)
	@gpus=$$($(PY) -c "import torch; print(torch.cuda.device_count())"); \
	if [ "$$gpus" -gt 0 ]; then \
	  echo "[make train] $$gpus GPU(s): 'seed' preset under torchrun --nproc-per-node=$$gpus"; \
	  $(VENV)/bin/torchrun --standalone --nproc-per-node=$$gpus train_ddp.py --preset seed $(ARGS); \
	else \
	  echo "[make train] no GPU: 'cpu' preset in one process"; \
	  $(PY) train_ddp.py --preset cpu $(ARGS); \
	fi

sweep: $(STAMP)
	@gpus=$$($(PY) -c "import torch; print(torch.cuda.device_count())"); \
	if [ "$$gpus" -gt 0 ]; then sweep=sweeps/vth_aa.yaml; else sweep=sweeps/smoke.yaml; fi; \
	echo "[make sweep] $$gpus GPU(s): $$sweep"; \
	$(PY) tune.py --sweep $$sweep $(ARGS)

ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

bench: $(STAMP)
	$(PY) bench/cpu.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
