"""The fixed cost of a `glyph-engine generate` process, measured apart from the cost per image.

Whole processes, interleaved so that a shared machine's drift falls on each alike:
- imports: Python importing torch, OpenVINO and numpy, what any program on this stack pays;
- warm: `generate metal -n 1 --steps 1` with the compiled cache filled (every later run);
- cold: the same with an empty cache (a first run: compiling included).
warm - imports is what glyph-engine adds to a warm start (its other imports, loading,
reading the compiled models); cold - warm is compiling. One image at one step costs a few
milliseconds here, so a warm run is the fixed cost; the cost per image is `bench`'s table.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from glyph_engine.cache import ENV_VAR
from glyph_engine.errors import GlyphEngineError

BASELINE_IMPORTS = "import torch, openvino, numpy"
RUNS = ("imports", "warm", "cold")


def generate_command(options: Sequence[str]) -> list[str]:
    """The measured `generate`: one image at one step, so that what is timed is the fixed cost."""
    return [sys.executable, "-m", "glyph_engine", "generate", "metal", "-n", "1", "--steps", "1", "-q", *options]


def time_process(command: list[str], env: dict[str, str]) -> float:
    """Seconds a process takes, start to exit; one that fails is named with its last line."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise GlyphEngineError(f"the timed run `{' '.join([Path(command[0]).name, *command[1:5]])} ...` failed: {last}")
    return seconds


def measure_startup(
    options: Sequence[str] = (), repeats: int = 3, report: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Seconds of each kind of process (`RUNS`), `repeats` interleaved rounds, medians and the
    ratios the goals are stated in. `options`: generate's model and backend options.

    Caches and images go to a temporary folder removed afterwards: the user's cache is
    neither read (it would make "cold" warm) nor written.
    """
    runs: dict[str, list[float]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory(prefix="glyph-engine-startup-") as tmp:
        image = ["-o", str(Path(tmp) / "glyph.png")]
        warm_env = {**os.environ, ENV_VAR: str(Path(tmp) / "warm-cache")}
        time_process([*generate_command(options), *image], warm_env)  # fills the warm cache; not counted
        for round_ in range(repeats):
            cold_env = {**os.environ, ENV_VAR: str(Path(tmp) / f"cold-cache-{round_}")}
            runs["imports"].append(time_process([sys.executable, "-c", BASELINE_IMPORTS], warm_env))
            runs["warm"].append(time_process([*generate_command(options), *image], warm_env))
            runs["cold"].append(time_process([*generate_command(options), *image], cold_env))
            last = ", ".join(f"{name} {times[-1]:.2f} s" for name, times in runs.items())
            report(f"start-up round {round_ + 1}/{repeats}: {last}")
    median = {name: statistics.median(times) for name, times in runs.items()}
    return {
        "command": " ".join(["glyph-engine", *generate_command(options)[3:]]),
        "baseline": BASELINE_IMPORTS,
        "runs_s": runs,
        "median_s": median,
        "warm_over_imports": median["warm"] / median["imports"],
        "added_warm_s": median["warm"] - median["imports"],
        "compile_s": median["cold"] - median["warm"],
    }


def startup_markdown(startup: dict[str, Any]) -> str:
    median = startup["median_s"]
    return "\n".join(
        [
            "## Fixed cost per process",
            "",
            f'`{startup["command"]}` in fresh processes, interleaved with `python -c "{startup["baseline"]}"` '
            "(medians):",
            "",
            "| process | seconds | runs |",
            "| --- | ---: | --- |",
            *(
                f"| {name} | {median[name]:.2f} | {', '.join(f'{t:.2f}' for t in startup['runs_s'][name])} |"
                for name in RUNS
            ),
            "",
            f"Warm start: {startup['warm_over_imports']:.2f}x the imports alone ({startup['added_warm_s']:.2f} s "
            f"added by glyph-engine); compiling on the first run: {startup['compile_s']:.2f} s.",
        ]
    )
