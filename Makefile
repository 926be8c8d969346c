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

.PHONY: install install-dev demo demo-s3 test typecheck lint bench clean

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

test: install-dev typecheck lint
	$(BIN)/pytest -q

typecheck: install-dev
	$(BIN)/mypy -p warmpool

lint: install-dev
	$(BIN)/ruff check warmpool workers tests bench examples

bench: install
	$(BIN)/python bench/host_tier.py

clean:
	rm -rf $(VENV) node_modules build *.egg-info
