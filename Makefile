# The two set-up commands of the README. Both work from nothing: they create
# .venv, install the package and run. Override PYTHON, DATA or EPOCHS as needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The demo uses this file when it exists; otherwise Keras' MNIST, else sklearn's digits.
DATA ?= $(firstword $(wildcard ../shared/data/mnist.npz))
EPOCHS ?= 3
OUT ?= demo_output

.PHONY: demo test docs lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[plots]"
	touch $@

# tf_keras (needed by tfmot) depends on the full `tensorflow` wheel; beside
# tensorflow-cpu that would be a second copy, so the interop tests install it
# without dependencies, at the TensorFlow minor version already installed.
$(VENV)/.test-installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,jax,plots,docs,export]"
	$(BIN)/python -m pip install --quiet dm-tree
	$(BIN)/python -m pip install --quiet --no-deps "tensorflow-model-optimization>=0.8" \
	  "tf-keras~=$$(TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python -c 'import tensorflow as t; print(t.__version__.rsplit(".", 1)[0])').0"
	touch $@ $(VENV)/.demo-installed $(VENV)/.docs-installed

demo: $(VENV)/.demo-installed
	$(BIN)/python examples/ptsne_gated_mose.py $(if $(DATA),--data $(DATA)) --epochs $(EPOCHS) --out $(OUT)

test: $(VENV)/.test-installed
	KERAS_BACKEND=tensorflow $(BIN)/python -m pytest -n auto --dist worksteal --durations=25
	KERAS_BACKEND=jax $(BIN)/python -m pytest -n auto --dist worksteal --durations=25 -m "not tensorflow_only and not distributed"
	# keras.distribution over 4 host devices: JAX reads XLA_FLAGS when it starts. One
	# process: XLA's CPU collectives wait for every device's thread, and 2 x 4 devices
	# on a 2-core machine can starve one of them past XLA's 40 s rendezvous limit.
	KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=4 \
	  $(BIN)/python -m pytest -p no:xdist -m "distributed and not tensorflow_only" tests/distribution

$(VENV)/.docs-installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $@

# The documentation site (MkDocs, Material, mkdocstrings): guide pages, benchmarks and the
# API reference from the docstrings, into site/. --strict: a broken reference fails the build.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

lint: $(VENV)/.test-installed
	$(BIN)/ruff check keras_sparse_moe tests examples benchmarks

bench: $(VENV)/.demo-installed
	$(BIN)/python benchmarks/bench_sparse_dense.py $(if $(DATA),--data $(DATA))

clean:
	rm -rf $(VENV) $(OUT) site .pytest_cache .hypothesis build *.egg-info
