# The two set-up commands of the README. Both work from nothing: they create
# .venv, install the package and run. Override PYTHON, DATA or EPOCHS as needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The demo uses this file when it exists; otherwise Keras' MNIST, else sklearn's digits.
DATA ?= $(firstword $(wildcard ../shared/data/mnist.npz))
EPOCHS ?= 3
OUT ?= demo_output

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[plots]"
	touch $@

$(VENV)/.test-installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,jax,plots]"
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(BIN)/python examples/mnist_mlp.py $(if $(DATA),--data $(DATA)) --epochs $(EPOCHS) --out $(OUT)

test: $(VENV)/.test-installed
	KERAS_BACKEND=tensorflow $(BIN)/python -m pytest
	KERAS_BACKEND=jax $(BIN)/python -m pytest -m "not tensorflow_only"

lint: $(VENV)/.test-installed
	$(BIN)/ruff check keras_sparse_moe tests examples benchmarks

bench: $(VENV)/.demo-installed
	$(BIN)/python benchmarks/bench_sparse_dense.py $(if $(DATA),--data $(DATA))

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis build *.egg-info
