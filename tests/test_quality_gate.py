"""The eval-level quality gates on the embedded models: every precision other than FP32
against FP32, and the default (distilled) model against its teacher.

A reduced-precision path must keep `glyph-engine eval`'s radical lifts within 20% of FP32's
on the 8 prompts, and its share of broken samples at most 1 point above FP32's. Opt-in
(`pytest --quality-gate`): each path samples 8 x 64 glyphs (tens of minutes on 2 cores, bf16
several times longer where it is emulated). The U-Net part of the gate runs by default
(tests/test_openvino.py). Results of a run are in docs/bench-cpu.md.
"""

from pathlib import Path

import pytest

pytest.importorskip("openvino", reason="the CPU default needs OpenVINO")

from glyph_engine.backend_factory import create_backend  # noqa: E402 - after the skip
from glyph_engine.cache import ArtifactCache
from glyph_engine.checkpoint import load_model
from glyph_engine.model import DEFAULT_CHECKPOINT, DEFAULT_MODEL, TEACHER_MODEL
from glyph_engine.openvino_build import int8_gate
from glyph_engine.session import ModelSource
from glyph_engine.settings import GenerationSettings
from glyph_engine.training.commands import run_eval
from glyph_engine.training.dataset import build_glyph_set, save_glyph_set
from glyph_engine.training.evaluate import radical_hit_rates

pytestmark = pytest.mark.quality_gate

LIFT_TOLERANCE = 0.20
BROKEN_ALLOWANCE = 0.01


@pytest.fixture(scope="module")
def glyphs():
    try:
        return build_glyph_set(resolution=32)
    except Exception as e:  # noqa: BLE001 - no fonts or Unihan data here
        pytest.skip(f"needs the dataset (make system-data): {e}")


@pytest.fixture(scope="module")
def reference(glyphs, artifact_cache):
    model = load_model(DEFAULT_CHECKPOINT)
    fp32 = create_backend("torch", model, precision="fp32")
    return model, glyphs, radical_hit_rates(model, fp32, glyphs)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_eval_holds_against_fp32(reference, artifact_cache, precision):
    model, glyphs, fp32 = reference
    cache = ArtifactCache(artifact_cache)
    if precision == "int8":
        try:
            create_backend("openvino", model, precision="int8", cache=cache)
        except Exception:  # noqa: BLE001 - refused by the U-Net gate: auto never uses it
            gate = int8_gate(model, cache)
            assert gate is not None and not gate["passed"]
            pytest.skip(f"int8 fails the U-Net gate here ({gate['max_relative_error']:.1%}); auto never uses it")
    backend = create_backend("openvino", model, precision=precision, cache=cache)
    results = radical_hit_rates(model, backend, glyphs)
    for ours, theirs in zip(results, fp32, strict=True):
        assert abs(ours.lift - theirs.lift) <= LIFT_TOLERANCE * theirs.lift, (ours, theirs)
    broken = sum(r.broken_share for r in results) / len(results)
    broken_fp32 = sum(r.broken_share for r in fp32) / len(fp32)
    assert broken <= broken_fp32 + BROKEN_ALLOWANCE


def test_the_default_model_passes_the_gate_against_its_teacher(glyphs, tmp_path, artifact_cache):
    """Issue 26's gate, as `eval --ckpt glyffuser-small-distilled --against glyffuser-small`
    runs it (64 glyphs per prompt, each model at its own defaults, the teacher at 20 steps)."""
    data = tmp_path / "glyphs.npz"
    save_glyph_set(glyphs, data)
    student, teacher = (ModelSource(ckpt=Path(m), cache_dir=artifact_cache) for m in (DEFAULT_MODEL, TEACHER_MODEL))
    evaluation = run_eval(data, student, 64, GenerationSettings(), teacher)
    assert evaluation.passed, evaluation.report
