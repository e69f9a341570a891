# Two commands for a newcomer: `make run` (install + start) and `make test` (install + test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test install install-test lint

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

test: install-test lint
	$(BIN)/python -m pytest -q
