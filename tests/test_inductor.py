"""The AOTInductor backend: U-Net and T5 compiled ahead of time on first use, cached, loaded
without inductor or dynamo. Numerics are checked against eager PyTorch FP32.

Slow: each compile runs a C++ compiler over the generated kernels (1-2 minutes per
component on 2 cores, even for the tiny test model). The session's artifact cache keeps each
build for the tests after it, as a user's cache keeps it between runs.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import glyph_engine.inductor_build as inductor_build
from glyph_engine.backend_factory import create_backend
from glyph_engine.backends.inductor import load_package, rows_per_call
from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.cache import ArtifactCache
from glyph_engine.checkpoint import load_model
from glyph_engine.cli import app
from glyph_engine.errors import GlyphEngineError
from glyph_engine.model import TEACHER_CHECKPOINT
from glyph_engine.quality import GATE_PROMPTS, MAX_UNET_RELATIVE_ERROR, relative_errors, torch_unet, trajectory_calls
from glyph_engine.settings import Precision

from factories import record_builds, student_of, warm_generate_imports

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to compile the packages"),
]
runner = CliRunner()


@pytest.fixture
def build_count(monkeypatch):
    """(component, precision) of each package compiled (cache misses)."""
    return record_builds(
        monkeypatch, inductor_build, lambda model, component, precision, progress: (component, precision.value)
    )


def calls(model, rows=(1, 3)):
    """U-Net inputs at several batch sizes and text lengths (the packages' axes are dynamic)."""
    generator = torch.Generator().manual_seed(0)
    for batch, length in zip(rows, (4, 7, 5), strict=False):
        ids = torch.randint(3, 90, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length // 2 :] = 0
        yield torch.randn(batch, *model.image_shape, generator=generator), ids * mask, mask


def test_fp32_matches_pytorch_and_a_second_start_reads_the_cache(model, artifact_cache, build_count):
    cache = ArtifactCache(artifact_cache)
    backend = create_backend("inductor", model, precision="fp32", cache=cache)
    assert backend.name == "inductor" and backend.precision == "fp32"
    reference = TorchBackend(model, device="cpu")
    # The last batch is one row more than a call holds: it runs as two calls.
    for x, ids, mask in calls(model, rows=(1, 3, rows_per_call(model.image_shape[1] ** 2, "fp32") + 1)):
        text = backend.encode_text(ids, mask)
        torch.testing.assert_close(text, reference.encode_text(ids, mask), atol=1e-4, rtol=1e-4)
        eps = backend.denoise(x, 500, text, mask)
        assert eps.dtype == torch.float32 and eps.shape == x.shape
        torch.testing.assert_close(eps, reference.denoise(x, 500, text, mask), atol=1e-4, rtol=1e-3)
    assert sorted(build_count) == [("text_encoder", "fp32"), ("unet", "fp32")]
    create_backend("inductor", model, precision="fp32", cache=cache)
    assert len(build_count) == 2  # the second start compiled nothing


def test_bf16_passes_the_quality_gate_on_real_trajectories(artifact_cache, build_count):
    """The embedded model's bf16 U-Net against eager FP32 on what the sampler really feeds it
    (as tests/test_openvino.py holds OpenVINO's): within the 1% gate, and above FP32's error,
    or the path ran in FP32."""
    model = load_model(TEACHER_CHECKPOINT)
    calls = trajectory_calls(model, TorchBackend(model, device="cpu"), GATE_PROMPTS, 1, seed=2)
    backend = create_backend("inductor", model, precision="bf16", cache=ArtifactCache(artifact_cache))
    assert backend.precision == "bf16"

    def candidate(call):
        return backend.denoise(call.sample, call.timestep, call.text, call.mask)

    errors = relative_errors(candidate, torch_unet(model), calls)
    assert 1e-4 <= max(errors) <= MAX_UNET_RELATIVE_ERROR, errors
    assert sorted(build_count) == [("text_encoder", "fp32"), ("unet", "bf16")]  # no fp32 U-Net for bf16


def test_a_student_runs_with_its_guidance_input(model, artifact_cache):
    torch.manual_seed(0)
    # Its own hash: student_of keeps the teacher's, and the cache keys packages by it.
    student = dataclasses.replace(student_of(model, class_embedding_zero=False), sha256="test-student")
    backend = create_backend("inductor", student, precision="fp32", cache=ArtifactCache(artifact_cache))
    reference = TorchBackend(student, device="cpu")
    x, ids, mask = next(calls(student, rows=(2,)))
    text = reference.encode_text(ids, mask)
    low, high = (backend.denoise(x, 500, text, mask, guidance=g) for g in (2.0, 8.0))
    assert not torch.allclose(low, high)  # the input acts
    torch.testing.assert_close(high, reference.denoise(x, 500, text, mask, guidance=8.0), atol=1e-4, rtol=1e-3)


def test_generate_on_inductor_draws_what_pytorch_draws(ckpt_path, tmp_path):
    common = ["generate", "metal", "-n", "2", "--steps", "3", "--seed", "1", "--ckpt", str(ckpt_path)]
    grids = {}
    for backend in ("torch", "inductor"):
        out = tmp_path / f"{backend}.png"
        result = runner.invoke(app, [*common, "--backend", backend, "--precision", "fp32", "-o", str(out)])
        assert result.exit_code == 0, result.output
        grids[backend] = Image.open(out)
    assert grids["inductor"].text["backend"] == "inductor"
    torch_pixels, inductor_pixels = (np.asarray(g, dtype=np.int16) for g in grids.values())
    assert np.abs(torch_pixels - inductor_pixels).max() <= 2  # uint8 rounding of fp32-close outputs


def test_a_warm_start_imports_neither_inductor_nor_diffusers(ckpt_path, tmp_path):
    """Loading a package needs neither the compiler stack (inductor, dynamo) nor the model libraries."""
    args = ["--ckpt", str(ckpt_path), "--backend", "inductor", "--precision", "fp32"]
    modules = warm_generate_imports(args, tmp_path)
    assert {"glyph_engine.backends.inductor", "torch"} <= modules  # the report was read
    unwanted = {"torch._inductor", "torch._dynamo", "diffusers", "transformers"}
    assert not {m for m in modules if m in unwanted or m.split(".")[0] in unwanted}


def test_a_package_of_another_shape_is_refused(model, artifact_cache):
    backend, (text, unet) = inductor_build.open_inductor(model, ArtifactCache(artifact_cache), Precision.fp32)
    dims = text.meta["inputs"]
    assert dims == [[None, None], [None, None]] and unet.meta["inputs"][0] == [None, *model.image_shape]
    with pytest.raises(GlyphEngineError, match="takes 2 inputs, not 4; rebuild the cache entry"):
        load_package(text.files[inductor_build.PACKAGE], [*dims, [None], [None]], 4)
    with pytest.raises(GlyphEngineError, match="recorded input shapes are unusable"):
        load_package(text.files[inductor_build.PACKAGE], [[None, "x"], [None, None]], 2)
    # Text of another width than T5's: refused before the package reads it.
    width = unet.meta["inputs"][2][2]
    x, mask = torch.randn(2, *model.image_shape), torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(
        GlyphEngineError, match=rf"takes input 2 of shape \(any, any, {width}\); it was given \(2, 3, 8\)"
    ):
        backend.denoise(x, 500, torch.randn(2, 3, 8), mask)


def test_no_compiler_is_one_sentence(model, tmp_path, monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def missing():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    with pytest.raises(GlyphEngineError, match="found no compiler .*install g\\+\\+"):
        create_backend("inductor", model, cache=ArtifactCache(tmp_path))
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.parent.name != ".locks"]  # nothing half-built
