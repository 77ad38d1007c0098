# Two commands do all the set-up on a fresh machine:
#   make quickstart   install into .venv, prepare the embedded corpus, train, generate
#   make test         install into .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/mistura: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/mistura

# The tests also run the Triton kernels, through Triton's interpreter when there is no GPU, and llama.cpp
# (llama-cpp-python, built from source) on our GGUF exports, and lm-evaluation-harness on the `mistura` model.
$(VENV)/.test-extras: pyproject.toml $(BIN)/mistura
	$(BIN)/pip install --quiet -e ".[dev,triton,llamacpp,eval]"
	touch $@

quickstart: install
	$(BIN)/mistura train configs/quickstart.yaml

test: install $(VENV)/.test-extras
	$(BIN)/python -m pytest

.PHONY: install quickstart test
