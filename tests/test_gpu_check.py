"""`make gpu-check` (bench/gpu_check.py and the section modules beside it) on a machine without
a GPU: the CPU side of the op's parity sweep, one line about the GPU parts, exit status 0."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glyph_engine.step import fused_dpmpp_step

from step_flags import FLAGS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "bench"))  # the sections import each other as the script does

import gpu_install  # noqa: E402
import gpu_parity  # noqa: E402
import gpu_results  # noqa: E402
import gpu_run  # noqa: E402

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the fused op")


@needs_compiler
def test_without_a_gpu_the_cpu_sweep_runs_and_one_line_says_the_rest_needs_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != gpu_install.INSTALLED_ENV}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a GPU machine's GPU hidden: the CPU-only path either way
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert gpu_run.NO_GPU in result.stdout.splitlines()
    written = sorted(p.name for p in out.iterdir())
    assert len(written) <= 8 and set(written) <= set(gpu_results.FILES)
    assert {"environment.json", "parity.json", "summary.md"} <= set(written)

    parity = json.loads((out / "parity.json").read_text())
    cases = parity["cases"]
    assert parity["passed"] and parity["failed"] == [] and parity["op_status"]["cpu"] is None
    assert all(case["passed"] and case["device"] == "cpu" for case in cases)
    assert {case["dtype"] for case in cases} == {"float32", "float16"}
    assert {(c["guided"], c["second_order"], c["clamp"]) for c in cases} == set(FLAGS)
    assert any(case["misaligned"] and case["address_mod_16"] != 0 for case in cases)
    assert any(case["numel"] % 2 == 1 for case in cases)
    assert json.loads((out / "environment.json").read_text())["gpu"] is None


@needs_compiler
def test_the_parity_check_fails_an_op_that_is_slightly_off():
    """A wrong op must fail: the sweep cannot pass without comparing anything."""

    def off(*args):
        return tuple(t + 1e-2 for t in fused_dpmpp_step(*args))

    case = gpu_parity.Case("cpu", gpu_parity.torch.float32, 1023, guided=True, second_order=True, clamp=True)
    assert gpu_parity.check_case(case)["passed"]
    wrong = gpu_parity.check_case(case, op=off)
    assert not wrong["passed"] and wrong["max_abs_error"] == pytest.approx(1e-2, rel=1e-3)


def test_what_is_missing_is_installed_from_the_wheels_then_the_script_restarts(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("torch-9.9-py3-none-any.whl", "no_such_dist-1.0-py3-none-any.whl"):  # one installed, one not
        (wheels / name).write_bytes(b"")
    commands, restarts = [], []
    monkeypatch.setattr(gpu_install, "WHEELS", wheels)
    monkeypatch.setattr(gpu_install, "NEEDED_MODULES", ("no_such_module", "glyph_engine"))
    monkeypatch.setattr(
        gpu_install.subprocess,
        "run",
        lambda command, **_: commands.append(command) or subprocess.CompletedProcess([], 0),
    )
    monkeypatch.setattr(gpu_install.os, "execv", lambda path, argv: restarts.append(argv))
    monkeypatch.setenv(gpu_install.INSTALLED_ENV, "")  # so that the value the script sets is undone
    monkeypatch.delenv(gpu_install.INSTALLED_ENV)

    gpu_install.install_missing(SCRIPT)
    assert len(commands) == 1 and commands[0][-1] == str(wheels / "no_such_dist-1.0-py3-none-any.whl")
    assert "--no-index" in commands[0] and "--editable" not in commands[0]  # glyph_engine is importable here
    assert len(restarts) == 1 and restarts[0][1] == str(SCRIPT)
    # After the restart: what was installed is reported, and nothing is installed twice.
    assert gpu_install.install_missing(SCRIPT) == {"installed": ["no_such_dist-1.0-py3-none-any.whl"]}
    assert gpu_install.INSTALLED_ENV not in os.environ and len(commands) == 1
