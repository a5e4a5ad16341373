"""The fused step op against the pure-PyTorch step it replaces (sampler.dpmpp_step)."""

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from glyph_engine import cpp_ext
from glyph_engine.sampler import dpmpp_step, initial_noise, sample_dpmpp
from glyph_engine.schedule import SamplerConfig, StepCoefficients, dpmpp_coefficients

from sampler_cases import ALPHAS_CUMPROD, toy_eps
from step_flags import FLAGS

# Where a C++ compiler exists the op must build: a failed build fails these tests.
pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the fused op")

COEFFICIENTS = dpmpp_coefficients(ALPHAS_CUMPROD, 10)
FIRST, SECOND = COEFFICIENTS[0], COEFFICIENTS[4]  # x_scale 157 at the first step: a hard case
SHAPES = [(1, 1, 128, 128), (3, 1, 7, 5), (2, 3, 17, 33), (1,), (5,)]
# FP16 storage: the op computes in FP32 and rounds once; the reference runs on the same FP16
# inputs upcast to FP32. They may differ by the final rounding: one FP16 ulp (2^-10 relative).
TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3)}


def tolerance(device: str, dtype: torch.dtype, coef: StepCoefficients) -> dict:
    """TOLERANCE, but for FP32 on CUDA: FMA contraction on the GPU, so results differ by a few
    ulps of the largest term, x_scale * x (|x| < 6 for these inputs), which x0 may cancel to
    near zero. In FP16 the final rounding dominates there too."""
    if device == "cpu" or dtype == torch.float16:
        return TOLERANCE[dtype]
    return dict(rtol=1e-5, atol=1e-5 * max(1.0, coef.x_scale))


def fused(x, ec, eu, history, coef: StepCoefficients, guidance, clamp=None):
    """cpp_ext.dpmpp_step with sampler.dpmpp_step's arguments, so either can drive a sampler."""
    bounds = clamp if clamp is not None else (None, None)
    xp, c = history[0] if history else None, coef.prev[0] if coef.prev else 0.0
    return cpp_ext.dpmpp_step(x, ec, eu, xp, guidance, coef.x_scale, coef.eps_scale, coef.a, coef.b, c, *bounds)


def tensors(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(4)]


def reference(x, ec, eu, history, coef, guidance, clamp):
    """The pure-PyTorch step in FP32 on the same inputs, rounded to the inputs' dtype."""
    up = [None if t is None else t.float() for t in (x, ec, eu)]
    out = dpmpp_step(*up, tuple(t.float() for t in history), coef, guidance, clamp)
    return tuple(t.to(x.dtype) for t in out)


def check_flags(device, dtype, shape, order2, guided, clamp):
    x, ec, eu, xp = (t.to(device) for t in tensors(shape, dtype))
    coef = SECOND if order2 else FIRST
    eu = eu if guided else None
    bounds = (0.0, 1.0) if clamp else None
    ours = fused(x, ec, eu, (xp,), coef, 7.5, bounds)
    ref = reference(x, ec, eu, (xp,), coef, 7.5, bounds)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == dtype and a.shape == x.shape and a.device == x.device
        torch.testing.assert_close(a, b, **tolerance(device, dtype, coef))


def check_nan_clamp(device, dtype, shape, guided):
    """NaN in eps gives NaN in x0 and x_next exactly where eager `x0.clamp(lo, hi)` does;
    infinities clamp to the bounds."""
    x, ec, eu, _ = (t.to(device) for t in tensors(shape, dtype))
    flat = ec.view(-1)
    flat[:5] = math.nan
    flat[10::20] = math.inf
    flat[11::20] = -math.inf
    eu = eu if guided else None
    ours = fused(x, ec, eu, (), FIRST, 3.0, (0.0, 1.0))
    ref = reference(x, ec, eu, (), FIRST, 3.0, (0.0, 1.0))
    assert ours[1].isnan().sum() == 5
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, equal_nan=True, **tolerance(device, dtype, FIRST))


# --- what is built, and the refusals of the Python wrapper ---


def test_status_on_this_machine():
    status = cpp_ext.status()
    assert status is cpp_ext.status()  # built once per process
    assert set(status) == {"cpu", "cuda"}
    assert status["cpu"] is None  # a C++ compiler exists: the CPU op must build
    if torch.version.cuda is None:
        assert status["cuda"] == "this PyTorch has no CUDA"
    for device in ("cpu", "cuda", torch.device("cpu"), torch.device("cuda:0")):
        assert cpp_ext.available(device) == (status[torch.device(device).type] is None)
    assert cpp_ext.available()  # the default device is the CPU
    assert not cpp_ext.available("meta")  # a device type the op has no kernel for


@pytest.mark.parametrize(
    "torch_cuda, nvcc, problem",
    [
        (None, "13.0", "this PyTorch has no CUDA"),
        (None, None, "this PyTorch has no CUDA"),
        ("13.0", None, "nvcc not found"),
        ("13.0", "12.4", "nvcc is CUDA 12.4 but this PyTorch was built with CUDA 13.0"),
        ("12.8", "13.0", "nvcc is CUDA 13.0 but this PyTorch was built with CUDA 12.8"),
        ("12.8", "12.4", None),  # a minor mismatch builds: torch only warns about it
        ("13.0", "13.0", None),
    ],
)
def test_cuda_build_decision(torch_cuda, nvcc, problem):
    assert cpp_ext._cuda_build_problem(torch_cuda, nvcc) == problem


@pytest.mark.parametrize(
    "cuda_problem, cuda_build, cpu_build, builds, expected",
    [
        ("nvcc not found", None, None, [False], {"cpu": None, "cuda": "nvcc not found"}),
        (None, None, None, [True], {"cpu": None, "cuda": None}),
        (None, "boom", None, [True, False], {"cpu": None, "cuda": "the CUDA build failed: boom"}),
        (None, "boom", "no ninja", [True, False], {"cpu": "no ninja", "cuda": "the CUDA build failed: boom"}),
    ],
    ids=["cuda-skipped", "both", "cuda-failed", "none"],
)
def test_each_device_is_built_for_on_its_own(monkeypatch, cuda_problem, cuda_build, cpu_build, builds, expected):
    """A CUDA build that cannot or does not work costs the CUDA op only."""
    tried = []

    def build(with_cuda):
        tried.append(with_cuda)
        return cuda_build if with_cuda else cpu_build

    monkeypatch.setattr(cpp_ext, "_build", build)
    monkeypatch.setattr(cpp_ext, "_cuda_build_problem", lambda torch_cuda, nvcc_version: cuda_problem)
    assert cpp_ext.status.__wrapped__() == expected  # uncached: the real status() is left alone
    assert tried == builds


def test_nvcc_version_without_nvcc(tmp_path):
    assert cpp_ext._nvcc_version(None) is None
    assert cpp_ext._nvcc_version(str(tmp_path)) is None  # no bin/nvcc there


@pytest.mark.nvcc
def test_nvcc_version_is_parsed(nvcc):
    version = cpp_ext._nvcc_version(str(Path(nvcc).parent.parent))
    assert version is not None and version.split(".")[0].isdigit()
    assert f"release {version}" in subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout


def test_unavailable_device_is_refused(monkeypatch):
    monkeypatch.setattr(cpp_ext, "status", lambda: {"cpu": "no compiler found", "cuda": "nvcc not found"})
    assert not cpp_ext.available("cpu") and not cpp_ext.available("cuda:0")
    x, ec, _, _ = tensors((2, 3), torch.float32)
    with pytest.raises(cpp_ext.OpUnavailable, match="not available on cpu: no compiler found"):
        fused(x, ec, None, (), FIRST, 1.0)
    assert issubclass(cpp_ext.OpUnavailable, RuntimeError)


def test_second_order_step_needs_history():
    x, ec, _, _ = tensors((2, 3), torch.float32)
    assert SECOND.prev[0] != 0.0
    with pytest.raises(ValueError, match="previous step's x0"):
        fused(x, ec, None, (), SECOND, 1.0)


# --- the CPU op against the eager step ---


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("guided, order2, clamp", FLAGS)
def test_op_matches_reference(dtype, shape, order2, guided, clamp):
    check_flags("cpu", dtype, shape, order2, guided, clamp)


def test_fp32_equals_eager_bitwise():
    """No FMA contraction in the C++ build: the same roundings as eager PyTorch."""
    x, ec, eu, xp = tensors((4, 1, 64, 64), torch.float32)
    ours = fused(x, ec, eu, (xp,), SECOND, 5.0)
    ref = dpmpp_step(x, ec, eu, (xp,), SECOND, 5.0)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("guided", [False, True])
def test_nan_passes_the_clamp(dtype, guided):
    check_nan_clamp("cpu", dtype, (3, 37), guided)


def test_noncontiguous_inputs_are_handled():
    x, ec, eu, xp = (t.transpose(2, 3) for t in tensors((2, 1, 16, 8), torch.float32))
    assert not x.is_contiguous()
    ours = fused(x, ec, eu, (xp,), SECOND, 3.0)
    ref = dpmpp_step(x, ec, eu, (xp,), SECOND, 3.0)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_eps_of_another_dtype_is_cast():
    x, ec, eu, xp = tensors((2, 1, 8, 8), torch.float32)
    ours = fused(x, ec.half(), eu.half(), (xp,), SECOND, 3.0)
    ref = dpmpp_step(x, ec.half(), eu.half(), (xp,), SECOND, 3.0)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)


def raw(x, ec, eu=None, xp=None, clamp=(None, None)):
    cpp_ext.status()  # loads the op
    return torch.ops.glyph_engine.dpmpp_step(x, ec, eu, xp, 1.0, 1.0, 0.5, 0.9, 0.1, -0.05, *clamp)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x, e: raw(x.transpose(0, 1), e.transpose(0, 1).contiguous()), "x is not contiguous"),
        (lambda x, e: raw(x, e.half()), "eps_cond is Half, x is Float"),
        (lambda x, e: raw(x, e[:1]), "eps_cond has shape"),
        (lambda x, e: raw(x.double(), e.double()), "float32 or float16"),
        (lambda x, e: raw(x, e, clamp=(0.0, None)), "both clamp bounds"),
    ],
    ids=["noncontiguous", "dtype", "shape", "float64", "clamp"],
)
def test_raw_op_refuses_bad_inputs_clearly(make, message):
    x, e = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=message):
        make(x, e)


@pytest.mark.parametrize("guided, order2, clamp", [(True, True, False), (False, False, True), (True, False, True)])
def test_opcheck(guided, order2, clamp):
    cpp_ext.status()  # loads the op, with its shape-only (Meta) kernel for fake tensors
    x, ec, eu, xp = tensors((2, 1, 5, 3), torch.float32)
    args = (x, ec, eu if guided else None, xp if order2 else None, 4.0, 1.2, 0.7, 0.9, 0.3, -0.1 if order2 else 0.0)
    args += (0.0, 1.0) if clamp else (None, None)
    torch.library.opcheck(torch.ops.glyph_engine.dpmpp_step.default, args)


def test_meta_tensors_run_through_the_op():
    """Shapes without data (meta tensors, torch.compile's tracing): the library's Meta kernel."""
    cpp_ext.status()
    x = torch.empty(3, 1, 8, 8, dtype=torch.float16, device="meta")
    out = torch.ops.glyph_engine.dpmpp_step(x, x, x, None, 2.0, 1.0, 0.5, 0.9, 0.1, 0.0, 0.0, 1.0)
    assert [(t.device.type, t.shape, t.dtype) for t in out] == [("meta", x.shape, torch.float16)] * 2


@pytest.mark.parametrize("steps", [2, 10, 20])
@pytest.mark.parametrize("guided", [False, True])
def test_full_trajectory_fused_equals_unfused(steps, guided):
    coefficients = dpmpp_coefficients(ALPHAS_CUMPROD, steps, SamplerConfig(order=2))
    x = initial_noise([1, 2, 3], (1, 16, 16))

    def predict(x, t):
        return toy_eps(x, t), (0.5 * toy_eps(x, t) if guided else None)

    ours = sample_dpmpp(predict, x.clone(), coefficients, 4.0, step=fused)
    unfused = sample_dpmpp(predict, x.clone(), coefficients, 4.0, step=dpmpp_step)
    torch.testing.assert_close(ours, unfused, rtol=0, atol=1e-5)


# --- the CUDA kernel: compiled here with nvcc, run where a GPU exists ---


@pytest.mark.nvcc
@pytest.mark.parametrize("arch", ["80", "86", "90"])
def test_cuda_kernel_compiles(arch, nvcc, tmp_path):
    out = tmp_path / f"kernel_sm{arch}.o"
    source = cpp_ext.CSRC / "dpmpp_step_kernel.cu"
    gencode = f"arch=compute_{arch},code=sm_{arch}"
    result = subprocess.run(
        [nvcc, "-std=c++17", "-O3", "-c", "-gencode", gencode, str(source), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 10_000
    symbols = subprocess.run(["nm", "-C", str(out)], capture_output=True, text=True).stdout
    assert "glyph_engine::launch_dpmpp_step_f32" in symbols and "glyph_engine::launch_dpmpp_step_f16" in symbols


# The kernel's per-element function on the host, fed (x, eps) pairs; prints "x0 x_next" per pair.
HARNESS = """
#include <cmath>
#include <cstdio>
#include "dpmpp_step_kernel.cu"

int main() {
  // guidance, x_scale, eps_scale, a, b, c, clamp_min, clamp_max, guided, second_order, clamp
  const glyph_engine::StepParams p{1.f, 2.f, 0.5f, 0.25f, 0.75f, 0.f, 0.f, 1.f, false, false, true};
  const float cases[][2] = {{0.f, NAN}, {1.f, NAN}, {0.3f, 0.2f}, {5.f, 0.f},
                            {-5.f, 0.f}, {0.f, INFINITY}, {0.f, -INFINITY}};
  for (const auto& c : cases) {
    float x_next, x0;
    glyph_engine::step_one<false, false, true>(c[0], c[1], 0.f, 0.f, p, x_next, x0);
    std::printf("%.9g %.9g\\n", x0, x_next);
  }
}
"""


@pytest.mark.nvcc
def test_cuda_clamp_keeps_nan(nvcc, tmp_path):
    """The kernel's clamp lets NaN through as torch.clamp does (fminf/fmaxf alone drop it).

    Runs the kernel's step_one on the host, so no GPU is needed."""
    (tmp_path / "harness.cu").write_text(HARNESS)
    exe = tmp_path / "harness"
    build = subprocess.run(
        [nvcc, "-std=c++17", "-I", str(cpp_ext.CSRC), str(tmp_path / "harness.cu"), "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split("\n")
    got = [tuple(float(v) for v in line.split()) for line in lines if line]
    x = torch.tensor([0.0, 1.0, 0.3, 5.0, -5.0, 0.0, 0.0])
    eps = torch.tensor([math.nan, math.nan, 0.2, 0.0, 0.0, math.inf, -math.inf])
    x0 = (2.0 * x - 0.5 * eps).clamp(0.0, 1.0)
    expected = torch.stack([x0, 0.25 * x + 0.75 * x0], dim=1)
    torch.testing.assert_close(torch.tensor(got), expected, equal_nan=True, rtol=0, atol=1e-7)


@pytest.fixture
def cuda_op() -> None:
    """Skips where the CUDA kernel cannot be built (no nvcc, or one of another CUDA major
    version than PyTorch's). Where it can, it must have: a failed build fails the test."""
    from torch.utils import cpp_extension

    problem = cpp_ext._cuda_build_problem(torch.version.cuda, cpp_ext._nvcc_version(cpp_extension.CUDA_HOME))
    if problem is not None:
        pytest.skip(f"the CUDA op cannot be built here: {problem}")


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_op")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(128, 1, 128, 128), (3, 1, 7, 5), (1,), (5,), (257,), (1, 1, 129, 129)], ids=str)
@pytest.mark.parametrize("guided, order2, clamp", FLAGS)
def test_cuda_op_matches_reference(dtype, shape, order2, guided, clamp):
    """Vector paths (element counts divisible by 4) and the scalar path (odd counts)."""
    check_flags("cuda", dtype, shape, order2, guided, clamp)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_op")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_misaligned_views(dtype):
    """x[1:] of a flat tensor starts one element past an aligned address: the float4/half2
    paths must not be taken, though the element count divides by 4."""
    flat = [t.cuda() for t in tensors((4097,), dtype)]
    x, ec, eu, xp = (t[1:] for t in flat)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    ours = fused(x, ec, eu, (xp,), SECOND, 7.5, (0.0, 1.0))
    ref = reference(x, ec, eu, (xp,), SECOND, 7.5, (0.0, 1.0))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **tolerance("cuda", dtype, SECOND))


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_op")
def test_cuda_runs_on_the_current_stream():
    """The kernel is queued on torch's current stream: behind the work that produces its input
    there. On another stream it would read x before the copy lands."""
    x, ec, eu, xp = (t.cuda() for t in tensors((16, 1, 128, 128), torch.float32))
    late = torch.zeros_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # tens of milliseconds of GPU time before the copy
        late.copy_(x)
        ours = fused(late, ec, eu, (xp,), SECOND, 7.5)
    torch.cuda.current_stream().wait_stream(side)
    ref = reference(x, ec, eu, (xp,), SECOND, 7.5, None)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **tolerance("cuda", torch.float32, SECOND))


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_op")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 37), (4, 64)], ids=["scalar", "vector"])
@pytest.mark.parametrize("guided", [False, True])
def test_cuda_nan_passes_the_clamp(dtype, shape, guided):
    check_nan_clamp("cuda", dtype, shape, guided)
