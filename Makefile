# Set-up and checks. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
PIP = $(PYTHON) -m pip --disable-pip-version-check

.PHONY: install install-test system-data test test-slow test-cpu-kinds bench gpu-check gpu-wheels

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[onnx]'

# Unihan definitions and the CJK font for `glyph-engine dataset` (and its tests), and a
# headless browser for the page's test (Debian's chromium and its driver: browsers that
# packages download do not run on these machines), and a C++ compiler for the fused op and the
# inductor backend, as root on Debian; elsewhere those tests skip and say why.
system-data:
	@if [ ! -f /usr/share/unicode/Unihan_Readings.txt.bz2 ] || [ ! -f /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc ] \
		|| ! command -v chromedriver >/dev/null || ! command -v g++ >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq unicode-data fonts-noto-cjk \
				chromium chromium-driver g++ >/dev/null; \
		else echo "note: install Debian's unicode-data, fonts-noto-cjk, chromium, chromium-driver and g++ for the dataset, page, fused-op and inductor tests"; fi; \
	fi

# Tests also build TensorRT engines ahead of time: TensorRT-RTX installs from PyPI.
install-test: system-data
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,tensorrt-rtx]'

# The default run, kept under 10 minutes on 2 cores; the long tests (the full-size 131M model's,
# int8 calibration, 1000 steps, Ray chunks lost, the embedded model's broken samples, TensorRT-RTX builds, the inductor backend's C++ compiles) are `make test-slow` (about 15 minutes more), the CPU-kind runs `make test-cpu-kinds`. CI (.ci/run)
# runs all three.
test: install-test
	$(PYTHON) -m pytest -m "not slow" --durations=25

test-slow: install-test
	$(PYTHON) -m pytest -m slow

# The tests whose outcome depends on the CPU's flags, run as on each CPU kind of the project's
# machines (pytest --cpu-kind, tests/conftest.py): the detection and its override, OpenVINO and
# the precision auto picks, the artifact cache (its keys hold the flags), and generate, bulk and
# eval through the CLI on the default backend. The rest of the suite (sampler maths, export,
# TensorRT, training, serve's HTTP handling) runs the same on any CPU and runs once, in `make
# test`; serve and bulk on Ray choose their backend through the same code as generate.
CPU_KINDS = avx2 avx512 avx512-bf16
CPU_KIND_TESTS = tests/test_cpu.py tests/test_openvino.py tests/test_cache.py tests/test_cli.py tests/test_bulk.py \
	tests/test_train.py::test_train_and_eval_cli
test-cpu-kinds: install-test
	set -e; for kind in $(CPU_KINDS); do $(PYTHON) -m pytest -m "not slow and not ray" --cpu-kind $$kind $(CPU_KIND_TESTS); done

bench: install-test
	$(PYTHON) -m pytest --benchmark-only

# Everything GPU-side in one pass on a GPU machine (bench/gpu_check.py, which runs the section
# modules bench/gpu_*.py), results in $(OUT); elsewhere the CPU side of the op's parity sweep.
# No install step: the GPU machine has no network; what it lacks is installed from wheels/
# (make gpu-wheels).
OUT ?= gpu-results
gpu-check:
	$(PYTHON) bench/gpu_check.py --out $(OUT)

# Wheels for the GPU machine (Python 3.12, x86-64; torch, transformers, onnx, onnxruntime,
# pytest, nvcc, ninja, triton, no network), to carry there in wheels/: diffusers, its
# requirements and glyph-engine's that transformers does not bring, and setuptools, wheel and
# packaging (wheel's requirement) to build glyph-engine itself. At the versions installed
# here, which the tests ran with; no dependencies pulled in. The folder travels with the
# repository: 64 MiB in all.
GPU_WHEELS = diffusers importlib-metadata zipp lazy-importer pillow sentencepiece \
	requests urllib3 idna certifi charset-normalizer setuptools wheel packaging
PINNED = import re, sys; from importlib.metadata import distributions; \
	have = {re.sub("[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in distributions()}; \
	print(*(n + "==" + have[n] if n in have else n for n in sys.argv[1:]))
gpu-wheels:
	rm -rf wheels
	$(PIP) download --quiet --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d wheels \
		$$($(PYTHON) -c '$(PINNED)' $(GPU_WHEELS))
	@du -sm wheels | awk '{ print "wheels/: " $$1 " MiB"; if ($$1 > 60) { print "wheels/ is over 60 MiB"; exit 1 } }'
