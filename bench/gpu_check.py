"""`make gpu-check`: everything GPU-side in one pass, results in one folder.

    python bench/gpu_check.py [--out gpu-results] [--skip-suite] [--quick]

This file installs what is missing, then hands over to gpu_run.py, which runs the sections in
order; each section is a module of its own beside them. Each reports in one JSON object (or
Markdown) in --out, at most 8 files (`gpu_results.FILES`), written after every section so that
a pass cut short keeps what it found:

1. gpu_install.py: what glyph-engine needs and the GPU machine lacks, installed from
   `wheels/`, then a restart. Recorded in environment.json.
2. gpu_environment.py, environment.json: Python, torch and its CUDA, the GPU, its clocks,
   nvcc, the CPU, libraries.
3. gpu_parity.py, parity.json: the fused op built and checked against the eager formula over
   every flag combination (tests/step_flags.py) x FP32/FP16, odd sizes, misaligned views; on
   CUDA also a non-default stream and 2^31+3 FP16 elements.
4. gpu_pytest.py, pytest.md: `pytest -m gpu`.
5. gpu_generate.py, generate.json: `generate` on CUDA with the fused and the eager step.
6. gpu_bench.py, bench-gpu.json, bench-gpu.md: the peer (`glyph_engine.peer`), glyph-engine
   eager and fastest on the full-size glyffuser and the embedded model, at the same guidance.
7. pytest.md again: the whole suite (unless --skip-suite), last, in what is left of the
   pass's 10 minutes.
8. summary.md: one line per section.

Without a GPU only the CPU side of the parity sweep runs; one line says so, and the exit
status is 0 when that passed. With one, the exit status is 0 when every section passed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gpu_install import install_missing

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-results"))
    parser.add_argument("--skip-suite", action="store_true", help="skip the whole-suite pytest run")
    parser.add_argument("--quick", action="store_true", help="a smaller parity sweep")
    args = parser.parse_args()

    started = time.monotonic()
    wheels = install_missing(Path(__file__).resolve())  # may restart this script
    # Only now is everything the sections import installed: glyph_engine, diffusers, and the
    # tests' helpers (the op's flag grid, the model factories) on the path.
    sys.path.insert(0, str(ROOT / "tests"))
    from gpu_run import run

    return run(args.out, wheels, quick=args.quick, suite=not args.skip_suite, started=started)


if __name__ == "__main__":
    sys.exit(main())
