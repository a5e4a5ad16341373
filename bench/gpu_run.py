"""make gpu-check's sections, run in order (see gpu_check.py), each written to --out as soon
as it ends; a section that fails fails alone, and the next ones still run."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gpu_bench import bench_gpu, bench_markdown, fmt
from gpu_environment import environment
from gpu_generate import generate_on_cuda
from gpu_parity import parity
from gpu_pytest import PYTEST_SECTIONS, pytest_markdown, pytest_run, whole_suite
from gpu_results import FILES, one_line, write

NO_GPU = (
    "gpu-check: the GPU parts (CUDA parity, pytest -m gpu, the suite on the GPU, generate on CUDA, "
    "the GPU benchmark) need a GPU machine; this one has none."
)


def run_section(name: str, section: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs one section; an exception fails that section only, so one pass reports on all of them."""
    start = time.perf_counter()
    try:
        result = section()
    except Exception as e:  # recorded with its traceback; the next sections still run
        result = {"passed": False, "error": f"{type(e).__name__}: {one_line(e)}"}
        result["traceback"] = traceback.format_exc().splitlines()[-15:]
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"gpu-check: {name}: {verdict(result)} ({result['seconds']} s)", flush=True)
    return result


def state(result: dict[str, Any]) -> str:
    return {True: "passed", False: "FAILED", None: "recorded"}[result["passed"]]


def verdict(result: dict[str, Any]) -> str:
    return f"{state(result)}: {result['error']}" if "error" in result else state(result)


def notes(name: str, result: dict[str, Any]) -> str:
    """The line of summary.md that says what a section found."""
    if "error" in result:
        return result["error"]
    if name == "parity":
        errors = {}
        for case in result["cases"]:
            if "max_abs_error" in case:
                key = f"{case['device']} {case['dtype']}"
                errors[key] = max(errors.get(key, 0.0), case["max_abs_error"])
        worst = ", ".join(f"{k} {v:.2g}" for k, v in errors.items())
        return (
            f"{len(result['cases'])} cases, {len(result['failed'])} failed, {len(result['skipped'])} skipped; "
            f"max abs error: {worst}; op built in {result['build_seconds']} s"
        )
    if name in PYTEST_SECTIONS:
        return result["summary"]
    if name == "generate":
        return f"max abs difference {result['max_abs_difference']:.2g}, op dispatches {result['op_dispatches']}"
    if name == "benchmark":
        return "; ".join(
            f"{e['name']}: {fmt(e['images_per_s'], '.1f')} images/s, peer {fmt(e['peer_images_per_s'], '.1f')}"
            for e in result["entries"]
        )
    return ", ".join(f"{k} {result.get(k)}" for k in ("gpu", "torch", "torch_cuda"))


def outputs(results: dict[str, dict[str, Any]], cuda: bool) -> dict[str, str | dict[str, Any] | list[Any]]:
    """The result files of the sections run so far, and the summary."""
    files: dict[str, str | dict[str, Any] | list[Any]] = {}
    for name, file in (("environment", "environment.json"), ("parity", "parity.json"), ("generate", "generate.json")):
        if name in results:
            files[file] = results[name]
    runs = [results[name] for name in PYTEST_SECTIONS if name in results]
    if runs:
        files["pytest.md"] = pytest_markdown(runs)
    if "benchmark" in results:
        files["bench-gpu.json"] = {k: v for k, v in results["benchmark"].items() if k != "passed"}
        files["bench-gpu.md"] = bench_markdown(results["benchmark"], results["environment"])
    summary = ["| section | result | seconds | notes |", "| --- | --- | ---: | --- |"]
    summary += [f"| {n} | {state(r)} | {r['seconds']} | {notes(n, r)} |" for n, r in results.items()]
    files["summary.md"] = "\n".join([*summary, *(() if cuda else ("", NO_GPU))]) + "\n"
    return files


def run(out: Path, wheels: dict[str, Any], quick: bool, suite: bool, started: float) -> int:
    """Every section this machine can run; the exit status (0 when none failed)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # the folder holds this run's results only
        (out / name).unlink(missing_ok=True)
    cuda = torch.cuda.is_available()
    plan: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("environment", lambda: environment(wheels)),
        ("parity", lambda: parity(cuda, quick)),
    ]
    if cuda:
        plan += [
            ("pytest -m gpu", lambda: pytest_run("pytest -m gpu", ["-m", "gpu"], timeout=300)),
            ("generate", generate_on_cuda),
            ("benchmark", bench_gpu),
        ]
        # Last: the longest section and the least GPU-specific; what ran before is written by then.
        if suite:
            plan.append(("pytest (whole suite)", lambda: whole_suite(started)))
    results: dict[str, dict[str, Any]] = {}
    for name, section in plan:
        results[name] = run_section(name, section)
        for file, content in outputs(results, cuda).items():  # after every section: a cut-off pass keeps its results
            write(out, file, content)
    if not cuda:
        print(NO_GPU)
    return 0 if all(r["passed"] is not False for r in results.values()) else 1
