"""The benchmark scripts (bench/*.py with options) start: each imports what it needs and
explains its options. They take minutes to run for real, so nothing else checks that a change
elsewhere (a renamed helper, a moved constant) has not broken one of them."""

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if "argparse" in p.read_text())


def test_every_benchmark_script_explains_its_options():
    assert {"wall_clock.py", "cpu_candidates.py", "unet_rate.py"} <= {p.name for p in SCRIPTS}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    # At once: each is mostly importing torch, and one after the other they take half a minute.
    running = {
        p.name: subprocess.Popen(
            [sys.executable, str(p), "--help"], cwd=BENCH, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        for p in SCRIPTS
    }  # fmt: skip
    failed = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        if process.returncode != 0 or "usage:" not in out:
            failed[name] = (process.returncode, err.strip().splitlines()[-1:] or out[:200])
    assert not failed, failed
