# Set-up and checks. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
PIP = $(PYTHON) -m pip --disable-pip-version-check

.PHONY: install install-test system-data test bench

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[onnx]'

# Unihan definitions and the CJK font for `glyph-engine dataset` (and its tests), as root
# on Debian; elsewhere those tests skip and say why.
system-data:
	@if [ ! -f /usr/share/unicode/Unihan_Readings.txt.bz2 ] || [ ! -f /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq unicode-data fonts-noto-cjk >/dev/null; \
		else echo "note: install Debian's unicode-data and fonts-noto-cjk for the dataset tests"; fi; \
	fi

# Tests also build TensorRT engines ahead of time: TensorRT-RTX installs from PyPI.
install-test: system-data
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,tensorrt-rtx]'

test: install-test
	$(PYTHON) -m pytest

bench: install-test
	$(PYTHON) -m pytest --benchmark-only
