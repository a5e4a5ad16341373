"""The fused step op against the pure-PyTorch step it replaces (sampler.dpmpp_step)."""

import itertools
import shutil
import subprocess

import pytest
import torch

from glyph_engine import cpp_ext
from glyph_engine.errors import GlyphEngineError
from glyph_engine.sampler import dpmpp_step, initial_noise, sample_dpmpp
from glyph_engine.schedule import SamplerConfig, dpmpp_coefficients

from test_sampler import ALPHAS_CUMPROD, toy_eps

# Where a C++ compiler exists the op must build: a failed build fails these tests.
pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the fused op")

COEFFICIENTS = dpmpp_coefficients(ALPHAS_CUMPROD, 10)
FIRST, SECOND = COEFFICIENTS[0], COEFFICIENTS[4]  # x_scale 157 at the first step: a hard case
SHAPES = [(1, 1, 128, 128), (3, 1, 7, 5), (2, 3, 17, 33), (1,), (5,)]
# FP16 storage: the op computes in FP32 and rounds once; the reference runs on the same FP16
# inputs upcast to FP32. They may differ by the final rounding: one FP16 ulp (2^-10 relative).
TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3)}


def tensors(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(4)]


def reference(x, ec, eu, xp, coef, guidance, clamp):
    """The pure-PyTorch step in FP32 on the same inputs, rounded to the inputs' dtype."""
    up = [None if t is None else t.float() for t in (x, ec, eu, xp)]
    out = dpmpp_step(*up, coef, guidance, clamp)
    return tuple(t.to(x.dtype) for t in out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("order2, guided, clamp", list(itertools.product([False, True], repeat=3)))
def test_op_matches_reference(dtype, shape, order2, guided, clamp):
    x, ec, eu, xp = tensors(shape, dtype)
    coef = SECOND if order2 else FIRST
    eu = eu if guided else None
    bounds = (0.0, 1.0) if clamp else None
    ours = cpp_ext.fused_dpmpp_step(x, ec, eu, xp, coef, 7.5, bounds)
    ref = reference(x, ec, eu, xp, coef, 7.5, bounds)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == dtype and a.shape == x.shape
        torch.testing.assert_close(a, b, **TOLERANCE[dtype])


def test_fp32_equals_eager_bitwise():
    """No FMA contraction in the C++ build: the same roundings as eager PyTorch."""
    x, ec, eu, xp = tensors((4, 1, 64, 64), torch.float32)
    ours = cpp_ext.fused_dpmpp_step(x, ec, eu, xp, SECOND, 5.0)
    ref = dpmpp_step(x, ec, eu, xp, SECOND, 5.0)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))


def test_noncontiguous_inputs_are_handled():
    x, ec, eu, xp = (t.transpose(2, 3) for t in tensors((2, 1, 16, 8), torch.float32))
    assert not x.is_contiguous()
    ours = cpp_ext.fused_dpmpp_step(x, ec, eu, xp, SECOND, 3.0)
    ref = dpmpp_step(x, ec, eu, xp, SECOND, 3.0)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_eps_of_another_dtype_is_cast():
    x, ec, eu, xp = tensors((2, 1, 8, 8), torch.float32)
    ours = cpp_ext.fused_dpmpp_step(x, ec.half(), eu.half(), xp, SECOND, 3.0)
    ref = dpmpp_step(x, ec.half(), eu.half(), xp, SECOND, 3.0)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)


def raw(x, ec, eu=None, xp=None, clamp=(None, None)):
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
    x, ec, eu, xp = tensors((2, 1, 5, 3), torch.float32)
    args = (x, ec, eu if guided else None, xp if order2 else None, 4.0, 1.2, 0.7, 0.9, 0.3, -0.1 if order2 else 0.0)
    args += (0.0, 1.0) if clamp else (None, None)
    torch.library.opcheck(torch.ops.glyph_engine.dpmpp_step.default, args)


@pytest.mark.parametrize("steps", [2, 10, 20])
@pytest.mark.parametrize("guided", [False, True])
def test_full_trajectory_fused_equals_unfused(steps, guided):
    coefficients = dpmpp_coefficients(ALPHAS_CUMPROD, steps, SamplerConfig())
    x = initial_noise([1, 2, 3], (1, 16, 16))

    def predict(x, t):
        return toy_eps(x, t), (0.5 * toy_eps(x, t) if guided else None)

    fused = sample_dpmpp(predict, x.clone(), coefficients, 4.0, step=cpp_ext.fused_dpmpp_step)
    unfused = sample_dpmpp(predict, x.clone(), coefficients, 4.0, step=dpmpp_step)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-5)


def test_generation_fused_equals_torch(model):
    from glyph_engine.backends.pytorch import TorchBackend
    from glyph_engine.pipeline import GenerationSettings, generate

    backend = TorchBackend(model)
    runs = {
        impl: generate(model, backend, ["metal"], 3, GenerationSettings(steps=20, guidance=4.0, step_impl=impl))
        for impl in ("fused", "torch")
    }
    assert runs["fused"].step_impl == "fused" and runs["torch"].step_impl == "torch"
    torch.testing.assert_close(runs["fused"].images, runs["torch"].images, rtol=0, atol=1e-5)


def test_select_step_without_the_op(monkeypatch):
    monkeypatch.setattr(cpp_ext, "load", lambda: "no compiler")
    assert cpp_ext.select_step("auto")[1] == "torch"
    with pytest.raises(GlyphEngineError, match="no compiler.*--step-impl torch"):
        cpp_ext.select_step("fused")
    assert "no compiler" in cpp_ext.status()


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(128, 1, 128, 128), (3, 1, 7, 5)], ids=str)
def test_cuda_op_matches_reference(dtype, shape):
    x, ec, eu, xp = (t.cuda() for t in tensors(shape, dtype))
    ours = cpp_ext.fused_dpmpp_step(x, ec, eu, xp, SECOND, 7.5, (0.0, 1.0))
    ref = reference(x, ec, eu, xp, SECOND, 7.5, (0.0, 1.0))
    for a, b in zip(ours, ref, strict=True):
        # FMA contraction on the GPU: a few FP32 ulps, relative to x_scale * x.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-3)
