# Two commands for a newcomer: `make run` (install + start) and `make test` (install + test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# TORCH=cpu: PyTorch's CPU-only wheels (no CUDA libraries), at the versions requirements-torch.txt pins, installed first.
TORCH ?= default
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Said at once when that index does not answer, instead of pip's minutes of retries and an unrelated error.
TORCH_CPU_UNREACHABLE = error: TORCH=cpu installs PyTorch's CPU-only wheels from $(TORCH_CPU_INDEX), which this \
machine cannot reach (its torch/ page did not load within 10 s): let this machine reach it, set TORCH_CPU_INDEX to a \
mirror of it, or leave TORCH=cpu out to install PyTorch from PyPI
# Options of `python -m backend weights download` run before the start, e.g. WEIGHTS=--no-grounding-dino.
WEIGHTS ?=

.PHONY: run test unit e2e browser soak screenshots label-studio install install-test lint docker

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Each install runs once and again only when its requirements files change: a stamp in the venv records it.
INSTALLED := $(VENV)/.requirements-installed
TEST_INSTALLED := $(VENV)/.requirements-test-installed

install: $(INSTALLED)

$(INSTALLED): requirements.txt requirements-torch.txt requirements-web.txt | $(BIN)/python
ifeq ($(TORCH),cpu)
	@$(BIN)/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' \
		$(TORCH_CPU_INDEX)/torch/ 2>/dev/null || { echo "$(TORCH_CPU_UNREACHABLE)" >&2; exit 1; }
	$(BIN)/pip install -q --index-url $(TORCH_CPU_INDEX) -r requirements-torch.txt
endif
	$(BIN)/pip install -q -r requirements.txt
	touch $@

install-test: $(TEST_INSTALLED)

$(TEST_INSTALLED): requirements-test.txt requirements-demo.txt requirements.txt requirements-torch.txt requirements-web.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

# Fetches only the official weights that are missing; files the settings point at are used as they are.
run: install
	$(BIN)/python -m backend weights download $(WEIGHTS)
	$(BIN)/gunicorn backend.wsgi:app

lint: install-test
	$(BIN)/ruff check backend tests bench
	$(BIN)/ruff format --check backend tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy backend

# Four stages: the unit suite, the end-to-end test against the real Label Studio through its API, the same Label
# Studio's labelling page in a browser, then the soak at its full size (about 4.5 minutes on an idle 2-core machine:
# docs/benchmarks.md, "The soak"), alone, as its pace and hit rate follow the machine's load. Label Studio's install
# (minutes of pip, on first use) runs beside the unit suite so that the e2e stage starts without it.
test: install-test lint
	$(MAKE) -j2 --output-sync=target unit label-studio
	$(MAKE) e2e
	$(MAKE) browser
	$(MAKE) soak

# Test processes for the unit suite; 2 suits the 2-core CI machine (each test process also starts servers). An idle
# process takes tests queued for the other (worksteal), so that no long test runs alone at the end. The slowest 20
# are listed, to see where the stage's time goes.
TEST_PROCESSES ?= 2

unit: install-test
	$(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist worksteal --durations=20

label-studio: install-test
	$(BIN)/python -m tests.e2e.label_studio

e2e: install-test
	$(BIN)/python -m pytest -q -m e2e tests/e2e

# Headless Chromium from Debian's `chromium` package (.ci/run installs it), driven by Playwright.
browser: install-test
	$(BIN)/python -m pytest -q -m browser tests/browser

# The soak (tests/soak): a project of SOAK_TASKS imported tasks walked by two annotators against real gunicorn, RQ
# workers and redis-servers, through restarts, a cache of a tenth of the project and torn bookkeeping lines.
SOAK_TASKS ?= 500

soak: install-test
	SOAK_TASKS=$(SOAK_TASKS) $(BIN)/python -m pytest -q -s -m soak tests/soak

# The screenshots in the docs (docs/annotator-*.png, docs/video-track-frame-*.png), retaken by the browser stage's
# tests that show them.
screenshots: install-test
	$(BIN)/python -m pytest -q -m browser tests/browser --readme-screenshots docs

# The Docker stage (tests/docker, as root): builds both images, starts the compose stack's CPU profile on loopback
# and sends it what Label Studio sends. Starts a Docker engine when none runs (Debian's docker.io, data root
# DOCKER_DATA_ROOT) and makes stand-in base images from Debian packages where no image registry answers.
docker: install-test
	$(BIN)/python -m pytest -q -s -m docker tests/docker
