# Two commands do all set-up on a fresh machine:
#   make demo   trains the embedded default (Fashion-MNIST from Debian's dataset-fashion-mnist)
#   make test   runs the test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: venv data kernels lint test test-slow demo demo-seeds bench-peers model-table clean

# The stamp is newer than requirements.txt once the pins are installed.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

# Debian ships the full Fashion-MNIST; install it when it is missing (needs root, as CI has).
data:
	@test -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz || \
	  { echo "installing Debian package dataset-fashion-mnist"; \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

# oneDNN's convolutions for XLA:CPU (efficientnet_jax/model/dnnl.py; 'auto' uses them on one CPU
# device), built against Debian's libdnnl-dev and jaxlib's FFI headers. Optional: where it cannot
# be built (no root for apt-get, no g++) the model keeps its pure-JAX kernels and the tests that
# need it skip.
DNNL_SO := efficientnet_jax/model/_dnnl_conv.so
$(DNNL_SO): efficientnet_jax/model/dnnl_conv.cc $(VENV)/.installed
	@test -f /usr/include/dnnl.hpp || { echo "installing Debian package libdnnl-dev"; \
	  apt-get update -qq && apt-get install -y -qq libdnnl-dev; } || true
	-g++ -O2 -std=c++17 -shared -fPIC -Wno-attributes -Wno-return-type \
	  -I$$($(PY) -c 'import jax; print(jax.ffi.include_dir())') $< -ldnnl -o $@

kernels: $(DNNL_SO)

test: venv data kernels lint
	$(PY) -m pytest -q -n 2 tests $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check .

test-slow: venv data kernels
	$(PY) -m pytest -q -n 2 -m slow tests $(PYTEST_ARGS)

demo: venv data kernels
	$(PY) train.py --config=configs/demo.py --workdir=runs/demo

# The demo with seeds 0, 1, 2 (~30 min here): per-seed accuracy and time, mean and spread.
demo-seeds: venv data kernels
	$(PY) scripts/demo_seeds.py

# The CPU benchmark against its peers. PyTorch (CPU build) + timm are installed into .peers/,
# outside the venv: peers to measure against, never dependencies. Where the registry serves
# CUDA builds, add PEER_PIP_ARGS=--index-url=https://download.pytorch.org/whl/cpu.
PEER_PIP_ARGS ?=
.peers/.installed:
	$(PY) -m pip install --quiet --target .peers $(PEER_PIP_ARGS) torch==2.13.0
	$(PY) -m pip install --quiet --target .peers --no-deps timm==1.0.31
	touch $@

bench-peers: venv .peers/.installed
	$(PY) scripts/benchmark.py --systems ours,keras_tf,torch --rounds 4 --steps 2 --json

model-table: venv
	$(PY) -m efficientnet_jax.model_table

clean:
	rm -rf $(VENV) .peers runs .pytest_cache $(DNNL_SO)
