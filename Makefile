# qPKI — the two commands of the README: `make run` and `make test`.
# Both install with the versions pinned in constraints.txt (the ones the tests ran with);
# `make run` installs only what running needs, `make test` adds the test extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet -c constraints.txt

.PHONY: install install-test run test lint bench bench-quick constraints clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(BIN)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	touch $@

$(BIN)/.installed-test: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[test]'
	touch $(BIN)/.installed $@

install: $(BIN)/.installed

install-test: $(BIN)/.installed-test

run: install
	$(BIN)/qpki run

lint: install-test
	$(BIN)/ruff check src tests bench app.py
	$(BIN)/mypy

# axe-core for the browser journeys (pinned by its package-lock.json); without npm the journeys
# are skipped locally (and fail in CI, which installs it).
AXE := tests/e2e/axe/node_modules/axe-core/axe.min.js
$(AXE): tests/e2e/axe/package.json tests/e2e/axe/package-lock.json
	@if command -v npm >/dev/null; then cd tests/e2e/axe && npm ci --no-audit --no-fund; \
	else echo "npm not found: the browser journeys will be skipped (apt-get install npm)"; fi

test: lint $(AXE)
	$(BIN)/python -m pytest

bench: install-test
	$(BIN)/python bench/run.py

bench-quick: install-test
	$(BIN)/python bench/run.py --quick

# Pin what the test venv holds now; commit the result with the change that needed it.
constraints: install-test
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis test-artifacts
