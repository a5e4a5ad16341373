"""make gpu-check, steps 4 and 7 (pytest.md): `pytest -m gpu` early, and the whole suite
last, in what is left of the pass's time."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

PYTEST_SECTIONS = ("pytest -m gpu", "pytest (whole suite)")
# The pass's length: about 10 minutes, and within a lent GPU machine's 10-minute limit a command.
PASS_SECONDS = 570


def pytest_run(title: str, args: list[str], timeout: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-q", *args]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as e:
        # On POSIX the output so far comes as bytes, whatever `text` says.
        code, output = None, (e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or "")
        output += f"\ntimed out after {timeout} s"
    lines = output.strip().splitlines()
    return {
        "title": title,
        "command": " ".join(["python", *command[1:]]),
        "exit_code": code,
        "seconds": round(time.perf_counter() - start, 1),
        "summary": lines[-1] if lines else "",
        "tail": lines[-60:],
        "passed": code == 0,
    }


def whole_suite(started: float) -> dict[str, Any]:
    """The whole suite in what is left of the pass's time, so that the pass ends within it."""
    # A test module that imports a CPU-only backend absent here (openvino: too big to travel
    # as a wheel) fails to import; the other modules still run, and the error is reported.
    left = int(PASS_SECONDS - (time.monotonic() - started))
    return pytest_run("the whole suite", ["--continue-on-collection-errors"], timeout=max(60, left))


def pytest_markdown(runs: list[dict[str, Any]]) -> str:
    lines = []
    for run in runs:
        if "error" in run:
            lines += [f"## {run.get('title', 'pytest')}", "", f"did not run: {run['error']}", ""]
            continue
        lines += [f"## {run['title']}", "", f"`{run['command']}`: exit code {run['exit_code']}, {run['seconds']} s", ""]
        lines += ["```", *run["tail"], "```", ""]
    return "\n".join(lines)
