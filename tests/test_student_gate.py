"""The student's quality gate: each of its four checks passes and fails on its own."""

from dataclasses import replace

import pytest
from typer.testing import CliRunner

from glyph_engine.cli import app
from glyph_engine.training import commands
from glyph_engine.training.evaluate import RadicalResult
from glyph_engine.training.student_gate import gate

# hit rate, base rate: lifts 25x, 10x, 5x, 3x
TEACHER = [
    RadicalResult("metal", 167, 0.90, 0.036, 0.258, 0.0, 0.002),
    RadicalResult("wood", 75, 0.41, 0.041, 0.280, 0.0, 0.002),
    RadicalResult("fire", 86, 0.085, 0.017, 0.272, 0.0, 0.002),
    RadicalResult("heart", 61, 0.084, 0.028, 0.280, 0.0, 0.002),
]


def student(**changes: dict) -> list[RadicalResult]:
    return [replace(r, **changes.get(r.prompt, {})) for r in TEACHER]


def failed(result) -> list[str]:
    return [c.name for c in result.checks if not c.passed]


def test_a_student_that_draws_as_its_teacher_passes():
    result = gate(TEACHER, student())
    assert result.passed and "passes" in str(result) and str(result).count("\n- pass: ") == 4


def test_a_lift_below_four_fifths_of_the_teachers_fails_and_is_named():
    assert gate(TEACHER, student(heart={"hit_rate": 0.068})).passed  # 2.43x: 81% of 3x
    result = gate(TEACHER, student(heart={"hit_rate": 0.066}))  # 2.36x: 79%
    assert failed(result) == ["every lift within 20% of the teacher's"]
    assert "heart 2.4x < 80% of 3.0x" in str(result)


def test_fewer_prompts_at_five_times_fails():
    # fire at 4.9x keeps within 20% of its 5x but drops out of the 5x prompts
    result = gate(TEACHER, student(fire={"hit_rate": 0.0833}))
    assert failed(result) == ["prompts at 5x or more"] and "student 2, teacher 3" in str(result)


@pytest.mark.parametrize(("broken", "passed"), [(0.04, True), (0.0404, False)])
def test_broken_share_at_most_one_point_above(broken, passed):
    # four prompts: one at 4% is 1 point over all
    assert gate(TEACHER, student(fire={"broken_share": broken})).passed is passed


def test_glyphs_closer_to_the_training_set_than_the_noise_allows_fail():
    # the allowance: 2 standard errors of the difference, 2 x sqrt(2) x 0.002 / 2 = 0.0028
    def closer_by(d):
        return student(**{r.prompt: {"mean_nn_distance": r.mean_nn_distance - d} for r in TEACHER})

    assert gate(TEACHER, closer_by(0.0025)).passed
    assert failed(gate(TEACHER, closer_by(0.0035))) == [
        "mean nearest-neighbour distance not lower (no copied training glyphs)"
    ]


def test_the_teacher_and_student_must_share_their_prompts():
    with pytest.raises(ValueError, match="same prompts"):
        gate(TEACHER, TEACHER[:3])


def test_eval_exits_1_when_the_student_fails(monkeypatch, tmp_path):
    calls = []

    def fake_eval(data, source, num_samples, settings, teacher=None):
        calls.append(teacher.ckpt)
        return commands.Evaluation("Gate, student against teacher: the student fails the gate.", False)

    monkeypatch.setattr(commands, "run_eval", fake_eval)
    result = CliRunner().invoke(app, ["eval", "--ckpt", "s.pt", "--against", "t.pt"])
    assert result.exit_code == 1 and "fails the gate" in result.output
    assert [str(c) for c in calls] == ["t.pt"]
