# Every target bootstraps .venv from nothing but Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nox -s demo

test: $(STAMP)
	$(BIN)/nox -s lint tests template

lint: $(STAMP)
	$(BIN)/nox -s lint

bench: $(STAMP)
	$(BIN)/nox -s bench

clean:
	rm -rf $(VENV) .nox .pytest_cache .ruff_cache
