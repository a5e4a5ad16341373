"""The embedded default model: a fresh install draws glyphs with no --ckpt."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from glyph_engine.checkpoint import load_model
from glyph_engine.cli import app
from glyph_engine.model import DEFAULT_CHECKPOINT, EMBEDDED_MODELS, TEACHER_CHECKPOINT, TEACHER_MODEL
from glyph_engine.training.evaluate import is_broken


def test_embedded_checkpoints_ship_within_budget():
    assert DEFAULT_CHECKPOINT in EMBEDDED_MODELS.values() and TEACHER_CHECKPOINT in EMBEDDED_MODELS.values()
    assert sum(path.stat().st_size for path in EMBEDDED_MODELS.values()) <= 25 * 2**20
    assert (DEFAULT_CHECKPOINT.parent / "MODEL_CARD.md").is_file()


def test_the_teachers_defaults():
    model = load_model(TEACHER_CHECKPOINT)
    assert model.default_guidance > 1.0  # trained with condition dropout for guidance
    # Chosen by eval (docs/guidance-interval.md): the radical lifts hold at 0.83x the time.
    assert model.guidance_interval == (0.5, 20.0)
    assert model.center_noise  # see test_centered_noise_draws_no_broken_samples
    # Chosen by the gate against its own 20 steps, on the gate's and on held-out prompts
    # (docs/fewer-steps.md); a default, not a training condition (no order recorded).
    assert (model.default_steps, model.default_order) == (14, None)


def test_the_default_is_the_teachers_distilled_student():
    """An 8-step student with the guidance input, distilled from the embedded teacher (its
    card names the teacher's hash), sampled at DPM-Solver++(2M) over its trained steps: the
    settings that passed the quality gate against the teacher (engine/models/MODEL_CARD.md)."""
    student, teacher = load_model(DEFAULT_CHECKPOINT), load_model(TEACHER_CHECKPOINT)
    assert student.guidance_embedding and not teacher.guidance_embedding
    assert (student.default_steps, student.default_sampler, student.default_order) == (8, "dpmpp-2m", 2)
    assert (student.default_guidance, student.guidance_interval) == (teacher.default_guidance, None)
    assert (student.clamp_x0, student.center_noise) == (teacher.clamp_x0, teacher.center_noise)
    assert student.metadata["teacher"] == f"{TEACHER_MODEL} (sha256 {teacher.sha256})"


@pytest.mark.slow  # about 25 s (64 glyphs of the embedded model): in `make test-slow`, which CI runs too
def test_centered_noise_draws_no_broken_samples():
    """The broken samples came from initial noise with a clearly negative mean (all of them
    below -0.048, i.e. 1.5 standard deviations): the model does not correct it and draws
    grey. Removing each image's noise mean (the embedded model's default) removes them."""
    from glyph_engine.backends.pytorch import TorchBackend
    from glyph_engine.pipeline import generate
    from glyph_engine.settings import GenerationSettings

    model = load_model(TEACHER_CHECKPOINT)
    backend = TorchBackend(model, device="cpu")
    runs = {
        center: generate(model, backend, ["metal"], 32, GenerationSettings(center_noise=center)).images[:, 0].numpy()
        for center in (False, True)
    }
    assert is_broken(runs[False]).sum() >= 2  # seeds 8, 19 and 24 of seed 0 draw grey without it
    assert is_broken(runs[True]).sum() == 0


def test_generate_without_ckpt_writes_a_grid(tmp_path):
    out = tmp_path / "glyphs.png"
    result = CliRunner().invoke(app, ["generate", "metal", "-n", "64", "-o", str(out)])
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(out))
    side = 8 * (32 + 2) + 2  # 8x8 glyphs of 32 px with 2 px white gaps
    assert grid.shape == (side, side)
    glyphs = [grid[2 + r * 34 : 34 + r * 34, 2 + c * 34 : 34 + c * 34] for r in range(8) for c in range(8)]
    assert sum(g.min() < 128 for g in glyphs) >= 56  # ink in (nearly) every glyph
    assert np.mean([g.mean() for g in glyphs]) > 128  # white background, dark strokes
    assert Image.open(out).text["model_sha256"] == load_model(DEFAULT_CHECKPOINT).sha256
