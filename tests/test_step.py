"""The fused sampler step is on the path users run: generate, bench and the library."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from typer.testing import CliRunner

from glyph_engine import cpp_ext, step
from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.benchmark import generation
from glyph_engine.cli import app
from glyph_engine.errors import GlyphEngineError
from glyph_engine.pipeline import generate
from glyph_engine.sampler import dpmpp_step
from glyph_engine.samplers import SAMPLERS
from glyph_engine.settings import GenerationSettings, StepImpl

OP = "glyph_engine::dpmpp_step"
needs_cpu_op = pytest.mark.skipif(not cpp_ext.available("cpu"), reason=f"fused op not built: {cpp_ext.status()}")


def op_dispatches(run) -> int:
    """How many times `run()` dispatched the fused op (torch's profiler sees every op call)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(event.count for event in prof.key_averages() if event.key == OP)


@needs_cpu_op
@pytest.mark.parametrize("impl, per_step", [("fused", 1), ("auto", 1), ("torch", 0)])
def test_generate_command_dispatches_the_fused_op(ckpt_path, tmp_path, impl, per_step):
    args = ["generate", "metal", "water", "-n", "2", "--steps", "4", "--batch-size", "3", "--ckpt", str(ckpt_path)]
    args += ["--step-impl", impl, "-o", str(tmp_path / "g.png")]
    result = {}
    calls = op_dispatches(lambda: result.setdefault("r", CliRunner().invoke(app, args)))
    assert result["r"].exit_code == 0, result["r"].output
    assert calls == per_step * 4 * 2  # 4 steps in each of 2 batches (4 glyphs, 3 per batch)


@needs_cpu_op
def test_benchmark_workload_dispatches_the_fused_op(model):
    run = generation(model, TorchBackend(model, device="cpu"), batch=2, steps=3, guidance=1.0)
    assert op_dispatches(run) == 3


@needs_cpu_op
@pytest.mark.parametrize("guidance, clamp", [(1.0, False), (4.0, False), (4.0, True)])
def test_fused_and_eager_images_agree(model, guidance, clamp):
    """Within the op's own tolerance (FP32: equal up to rounding, see tests/test_cpp_ext.py)."""
    backend = TorchBackend(model, device="cpu")
    runs = {
        impl: generate(
            model,
            backend,
            ["metal"],
            3,
            GenerationSettings(steps=20, guidance=guidance, clamp_x0=clamp, step_impl=impl),
        )
        for impl in (StepImpl.fused, StepImpl.torch)
    }
    assert runs[StepImpl.fused].step_impl is StepImpl.fused and runs[StepImpl.torch].step_impl is StepImpl.torch
    torch.testing.assert_close(runs[StepImpl.fused].images, runs[StepImpl.torch].images, rtol=0, atol=1e-5)


def test_auto_picks_fused_only_on_a_device_the_op_is_built_for(monkeypatch):
    monkeypatch.setattr(cpp_ext, "status", lambda: {"cpu": "no C++ compiler", "cuda": None})
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    two = SAMPLERS["dpmpp-2m"]
    assert step.select_step("auto", cpu, two) == (dpmpp_step, StepImpl.torch)
    assert step.select_step("auto", cuda, two) == (step.fused_dpmpp_step, StepImpl.fused)
    with pytest.raises(GlyphEngineError, match="not built for CPU .no C\\+\\+ compiler.*--step-impl torch"):
        step.select_step("fused", cpu, two)
    assert step.select_step("torch", cuda, two) == (dpmpp_step, StepImpl.torch)


def test_a_sampler_the_fused_op_does_not_cover_runs_the_eager_step(monkeypatch):
    """DPM-Solver++(3M) steps use two previous x0; the op takes one: auto runs the eager step
    where the op is built, and asking for the op is refused in one line."""
    monkeypatch.setattr(cpp_ext, "status", lambda: {"cpu": None, "cuda": None})
    three = SAMPLERS["dpmpp-3m"]
    assert step.select_step("auto", torch.device("cpu"), three) == (dpmpp_step, StepImpl.torch)
    with pytest.raises(GlyphEngineError, match="does not run --sampler dpmpp-3m"):
        step.select_step("fused", torch.device("cuda", 0), three)


def test_fused_on_a_device_without_the_op_is_a_one_line_error(ckpt_path, tmp_path, monkeypatch):
    monkeypatch.setattr(cpp_ext, "status", lambda: {"cpu": "no C++ compiler", "cuda": "no nvcc"})
    out = tmp_path / "g.png"
    args = ["generate", "metal", "-n", "1", "--steps", "1", "--step-impl", "fused", "--ckpt", str(ckpt_path)]
    result = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 2 and "not built for CPU" in result.output and not out.exists()


def test_info_says_per_device_whether_the_op_is_built(monkeypatch):
    monkeypatch.setattr(cpp_ext, "status", lambda: {"cpu": None, "cuda": "nvcc is CUDA 12.4, torch's is 13.0"})
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("fused step CPU") and line.endswith("built") for line in lines)
    assert any(line.startswith("fused step CUDA") and "not built (nvcc is CUDA 12.4" in line for line in lines)
