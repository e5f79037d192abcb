# Two entry points for a fresh clone (see README): `make demo` and `make test`.
# Each creates .venv if needed and installs the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint proto clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,models]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/miscnet demo -o out/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

proto: $(STAMP)
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) out
