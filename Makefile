# lowbit: the two quick-start commands are `make demo` and `make test` (see README.md).
# Everything installs into ./.venv; torch is pinned to the CPU build found locally
# (override with `make TORCH_SPEC=... test`).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench gpu-wheels data clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lowbit demo

test: $(STAMP)
	$(BIN)/python -m pytest

# Speed/memory/accuracy benchmark against FP32, BF16 and the peers; writes docs/performance.md.
# The peers (torchao, optimum-quanto) are an optional extra, installed here only.
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	$(BIN)/lowbit bench

# Wheels that scripts/gpu-check.sh installs on a lent GPU machine, which has PyTorch but not
# diffusers and cannot download (pure-Python wheels, the versions installed here).
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download -q --no-deps -d .gpu-wheels \
		"diffusers==$$($(BIN)/python -c 'import diffusers; print(diffusers.__version__)')" importlib_metadata

# Fashion-MNIST (Debian package) — only needed to train or to regenerate reference statistics;
# the demo and the tests run from what the repo ships.
data:
	@test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
