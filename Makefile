# Set-up and checks. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
PIP = $(PYTHON) -m pip --disable-pip-version-check

.PHONY: install install-test test bench

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[onnx]'

# Tests also build TensorRT engines ahead of time: TensorRT-RTX installs from PyPI.
install-test:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,tensorrt-rtx]'

test: install-test
	$(PYTHON) -m pytest

bench: install-test
	$(PYTHON) -m pytest --benchmark-only
