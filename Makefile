# Every target bootstraps .venv from nothing but a Python >= 3.12: the first of python3.12,
# python3.13, python3 and pyenv's installed versions that runs (.ci/find-python), unless
# PYTHON=/path/to/python is given. A .venv on an older Python is made anew.
PYTHON ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@$(BIN)/python -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null || { \
	  python="$(PYTHON)"; [ -n "$$python" ] || python=$$(.ci/find-python) || exit 1; \
	  rm -rf $(VENV); echo "$$python -m venv $(VENV)"; "$$python" -m venv $(VENV); }
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
