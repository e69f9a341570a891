# Two commands for a newcomer: `make run` (install + start) and `make test` (install + test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test unit e2e install install-test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt

install-test: $(BIN)/python
	$(BIN)/pip install -q -r requirements-test.txt

run: install
	$(BIN)/python -m backend weights download
	$(BIN)/gunicorn backend.wsgi:app

lint: install-test
	$(BIN)/ruff check backend tests bench
	$(BIN)/ruff format --check backend tests bench

# Two stages: the unit suite, then the end-to-end test against the real Label Studio (installs it on first use).
test: install-test lint unit e2e

unit: install-test
	$(BIN)/python -m pytest -q

e2e: install-test
	$(BIN)/python -m pytest -q -m e2e tests/e2e
