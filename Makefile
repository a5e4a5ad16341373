# Set-up and checks. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
PIP = $(PYTHON) -m pip --disable-pip-version-check

.PHONY: install test bench

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'

test: install
	$(PYTHON) -m pytest

bench: install
	$(PYTHON) -m pytest --benchmark-only
