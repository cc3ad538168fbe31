# ExtreMA toolkit. `make help` lists the targets. Job targets take their options in ARGS, e.g.
#   make pretrain ARGS="experiment=vitb_80x5_color cluster=slurm cluster.nodes=4"

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Versions tested here; set TORCH_PINS= to keep the torch build already in the venv (e.g. a cluster's own).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
INSTALL_STAMP := $(VENV)/.install-stamp
ARGS ?=

# Recipes that talk to SLURM see the local test cluster when it exists (on a real cluster: no change).
CLUSTER_ENV := source scripts/cluster/env.sh;

.PHONY: help install test lint format demo bench pretrain linprobe fastprobe finetune pipeline status results logs cancel \
	cluster-up cluster-down cluster-status cluster-clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

install: $(INSTALL_STAMP) ## Create .venv and install the toolkit with dev tools (quick when nothing changed)

# Re-run pip only when the package's requirements or the pins change.
$(INSTALL_STAMP): pyproject.toml
	@test -x $(PY) || { echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet $(TORCH_PINS) -e '.[dev]'
	@echo "$(TORCH_PINS)" > $@
	@echo "installed into $(VENV)"

# The pins are part of the stamp: changing TORCH_PINS reinstalls.
ifneq ($(wildcard $(INSTALL_STAMP)),)
ifneq ($(shell cat $(INSTALL_STAMP)),$(strip $(TORCH_PINS)))
.PHONY: $(INSTALL_STAMP)
endif
endif

test: install ## Run the tests (starts the local SLURM cluster for them where root is available)
	scripts/cluster/with-cluster.sh $(PY) -m pytest $(ARGS)

lint: install ## Check the code with ruff (lint rules and formatting)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install ## Format and autofix the code with ruff
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

demo: install ## Run the whole pipeline on the built-in demo data, locally
	$(CLUSTER_ENV) $(PY) -m launch demo $(ARGS)

bench: install ## Run the benchmark suite
	$(PY) -m benchmarks $(ARGS)

pretrain: install ## Submit an ExtreMA pretraining job (ARGS: Hydra overrides)
	$(CLUSTER_ENV) $(PY) -m launch pretrain $(ARGS)

linprobe: install ## Submit a linear-probe evaluation
	$(CLUSTER_ENV) $(PY) -m launch linprobe $(ARGS)

fastprobe: install ## Submit a fast probe (cached features, head grid) + kNN evaluation
	$(CLUSTER_ENV) $(PY) -m launch fastprobe $(ARGS)

finetune: install ## Submit a finetuning evaluation
	$(CLUSTER_ENV) $(PY) -m launch finetune $(ARGS)

pipeline: install ## Submit pretraining and its dependent evaluations
	$(CLUSTER_ENV) $(PY) -m launch pipeline $(ARGS)

status: install ## Show the state of an experiment's jobs
	$(CLUSTER_ENV) $(PY) -m launch status $(ARGS)

results: install ## Print an experiment's results table
	$(CLUSTER_ENV) $(PY) -m launch results $(ARGS)

logs: install ## Show a job's logs
	$(CLUSTER_ENV) $(PY) -m launch logs $(ARGS)

cancel: install ## Cancel an experiment's jobs
	$(CLUSTER_ENV) $(PY) -m launch cancel $(ARGS)

cluster-up: ## Start the local SLURM test cluster (2 nodes on loopback; needs root once)
	scripts/cluster/up.sh

cluster-down: ## Stop the local SLURM test cluster
	scripts/cluster/down.sh

cluster-status: ## Show the local cluster's daemons, sinfo and a sacct check
	scripts/cluster/status.sh

cluster-clean: cluster-down ## Stop the local cluster and delete its state (.cluster/)
	rm -rf .cluster
