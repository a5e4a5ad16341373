"""A distilled student is a checkpoint like any other: its U-Net takes the guidance scale as an
input (one pass per step, no unconditional half) and it records its own sampling defaults."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from typer.testing import CliRunner

from glyph_engine import cpp_ext
from glyph_engine.backend_factory import create_backend
from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.checkpoint import load_model, save_checkpoint
from glyph_engine.cli import app
from glyph_engine.errors import GlyphEngineError
from glyph_engine.pipeline import generate
from glyph_engine.schedule import SamplerConfig
from glyph_engine.settings import GenerationSettings

from factories import STUDENT_STEPS, student_of


@pytest.fixture
def student_path(model, tmp_path):
    path = tmp_path / "student.pt"
    save_checkpoint(student_of(model), path)
    return path


@pytest.fixture
def live_student_path(model, tmp_path):
    """A student whose guidance input acts (its embedding not zeroed)."""
    torch.manual_seed(0)
    path = tmp_path / "live.pt"
    save_checkpoint(student_of(model, class_embedding_zero=False), path)
    return path


class Counting:
    """A backend that records each U-Net call's batch and guidance input."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []
        self.name, self.device, self.precision = backend.name, backend.device, backend.precision

    def encode_text(self, input_ids, attention_mask):
        return self.backend.encode_text(input_ids, attention_mask)

    def denoise(self, x, timestep, text, mask, **kwargs):
        self.calls.append((x.shape[0], kwargs.get("guidance")))
        return self.backend.denoise(x, timestep, text, mask, **kwargs)


def test_a_student_round_trips_its_guidance_input_and_defaults(student_path):
    student = load_model(student_path)
    assert student.guidance_embedding
    assert (student.default_steps, student.default_sampler, student.default_order) == (STUDENT_STEPS, "dpmpp-2m", 2)
    resolved = GenerationSettings().resolve(student)
    assert (resolved.steps, resolved.schedule.order) == (STUDENT_STEPS, 2)


def test_a_student_runs_one_pass_per_step_fed_its_guidance(student_path, model):
    """With its guidance input zeroed the student is the teacher's conditional half: its
    glyphs are the teacher's unguided ones, from one U-Net pass of the batch per step."""
    student = load_model(student_path)
    counting = Counting(TorchBackend(student, device="cpu"))
    ours = generate(student, counting, ["metal"], 3, GenerationSettings(guidance=4.0, seed=2))
    assert counting.calls == [(3, 4.0)] * STUDENT_STEPS
    teacher = generate(
        model,
        TorchBackend(model, device="cpu"),
        ["metal"],
        3,
        GenerationSettings(steps=STUDENT_STEPS, guidance=1.0, seed=2, sampler=SamplerConfig(order=2)),
    )
    torch.testing.assert_close(ours.images, teacher.images, rtol=0, atol=1e-5)


def test_the_guidance_input_changes_the_glyphs(live_student_path):
    student = load_model(live_student_path)
    backend = TorchBackend(student, device="cpu")
    low, high = (generate(student, backend, ["metal"], 2, GenerationSettings(guidance=g)).images for g in (1.0, 8.0))
    assert (low - high).abs().max() > 1e-3


def test_generate_records_the_students_defaults(student_path, tmp_path):
    out = tmp_path / "glyphs"
    args = [
        "generate",
        "metal",
        "-n",
        "2",
        "--ckpt",
        str(student_path),
        "--backend",
        "torch",
        "-o",
        str(tmp_path / "g.png"),
    ]
    result = CliRunner().invoke(app, [*args, "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    meta = Image.open(out / "0000.png").text
    assert (meta["steps"], meta["sampler"]) == (str(STUDENT_STEPS), "dpmpp-2m order 2, linspace")
    assert np.asarray(Image.open(out / "0000.png")).std() > 0


def test_openvino_feeds_a_students_guidance_input(live_student_path):
    """The CPU default path: the graph takes the guidance as an input and predicts what PyTorch
    predicts (fp32; the feed is the same at every precision)."""
    torch.manual_seed(0)
    student = load_model(live_student_path)
    ours = create_backend("openvino", student, precision="fp32")
    reference = TorchBackend(student, device="cpu")
    x, text = torch.randn(2, *student.image_shape), torch.randn(2, 5, student.unet.config.cross_attention_dim)
    mask = torch.ones(2, 5, dtype=torch.long)
    for guidance in (1.0, 6.0):
        torch.testing.assert_close(
            ours.denoise(x, 500, text, mask, guidance=guidance),
            reference.denoise(x, 500, text, mask, guidance=guidance),
            atol=1e-4,
            rtol=1e-3,
        )


def test_a_checkpoint_with_unusable_sampling_defaults_is_refused(model, tmp_path):
    path = tmp_path / "bad.pt"
    save_checkpoint(dataclasses.replace(student_of(model), default_order=5), path)
    with pytest.raises(GlyphEngineError, match="sampling defaults generate cannot use"):
        load_model(path)


@pytest.mark.skipif(not cpp_ext.available("cpu"), reason=f"fused op not built: {cpp_ext.status()}")
def test_a_students_default_path_runs_the_fused_step(live_student_path, tmp_path):
    """`generate --ckpt student.pt` with no sampling options, on the CPU default backend: the
    student's steps (DPM-Solver++(2M) over its trained timesteps) each dispatch the fused op
    once, as a glyffuser's do. (fp32: the OpenVINO build the test above made; the step does
    not depend on the precision.)"""
    args = ["generate", "metal", "-n", "2", "--ckpt", str(live_student_path), "--precision", "fp32"]
    args += ["-o", str(tmp_path / "g.png")]
    result = {}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result["r"] = CliRunner().invoke(app, args)
    assert result["r"].exit_code == 0, result["r"].output
    assert sum(e.count for e in prof.key_averages() if e.key == "glyph_engine::dpmpp_step") == STUDENT_STEPS


@pytest.mark.parametrize(
    "settings, warned",
    [
        (GenerationSettings(), False),
        (GenerationSettings(steps=STUDENT_STEPS, sampler=SamplerConfig(order=2)), False),
        (GenerationSettings(steps=8), True),
        (GenerationSettings(sampler=SamplerConfig(order=1)), True),
        (GenerationSettings(sampler=SamplerConfig(spacing="trailing")), True),
        (GenerationSettings(sampler=SamplerConfig(name="dpmpp-3m")), True),
    ],
    ids=["defaults", "its-own", "steps", "order", "spacing", "sampler"],
)
def test_sampling_a_student_off_its_training_warns(student_path, caplog, settings, warned):
    settings.resolve(load_model(student_path))
    assert ("outside what it learnt" in caplog.text) == warned


@pytest.mark.parametrize("steps", [None, 20, 6])
def test_a_teachers_recorded_steps_are_a_default_not_a_training_condition(model, caplog, steps):
    """A teacher may record fewer default steps that passed the gate (the embedded model: 14);
    they are what `generate` runs without --steps, and other steps are no warning."""
    teacher = dataclasses.replace(model, default_steps=14)
    resolved = GenerationSettings(steps=steps).resolve(teacher)
    assert resolved.steps == (steps or 14)
    assert "outside what it learnt" not in caplog.text


def test_a_gates_reference_is_a_teacher_at_20_steps_and_a_student_at_its_own(model, student_path):
    """The fewer steps a teacher records were gated against 20: gating anything else against
    those would lower the bar with each reduction."""
    from glyph_engine.settings import DEFAULT_STEPS, reference_steps

    assert reference_steps(model) == DEFAULT_STEPS
    assert reference_steps(dataclasses.replace(model, default_steps=14)) == DEFAULT_STEPS
    student = load_model(student_path)
    assert reference_steps(student) == student.default_steps == STUDENT_STEPS


def test_the_peer_refuses_a_student_in_one_line(student_path):
    from glyph_engine.peer import Peer

    with pytest.raises(GlyphEngineError, match="distilled student.*teacher's weights"):
        Peer(load_model(student_path))
