# Two entry points for a fresh clone (see README): `make demo` and `make test`.
# Both use one virtual environment, .venv; each installs what it needs into it (stamps record what is there):
# the demo gets the core install only (no torch, diffusers or transformers), the tests add the
# dev, models and cluster extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint proto clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,models,cluster]'
	touch $@ $(VENV)/.installed-core

demo: $(VENV)/.installed-core
	$(BIN)/miscnet demo -o out/demo

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

proto: $(VENV)/.installed-test
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) out build
