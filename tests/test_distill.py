"""Distillation: the student's start, the guidance target, the progressive target, resume."""

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.cli import app
from glyph_engine.errors import GlyphEngineError
from glyph_engine.model import guidance_labels
from glyph_engine.pipeline import encode_prompts, guided_timesteps, unconditional_text
from glyph_engine.sampler import dpmpp_step, initial_noise, sample_dpmpp
from glyph_engine.samplers import get_sampler
from glyph_engine.schedule import SamplerConfig, StepCoefficients
from glyph_engine.settings import DEFAULT_STEPS
from glyph_engine.training.dataset import GlyphSet, load_glyph_set, save_glyph_set
from glyph_engine.training.distill import Distiller, distill, student_unet
from glyph_engine.training.distill_config import DistillConfig, stages
from glyph_engine.training.distill_state import STATE, fresh_optimizer, new_state
from glyph_engine.training.distill_targets import (
    STUDENT_SAMPLER,
    MidpointTable,
    StepTable,
    check_nested,
    clamped_error,
    ddim_step,
    guided_table,
    progressive_target,
    run_unet,
    teacher_guided_eps,
)

from sampler_cases import toy_eps

TINY = DistillConfig(batch_size=4, guidance_steps=2, start_steps=2, final_steps=1, stage_steps=1, warmup_steps=1)


@pytest.fixture(scope="module")
def glyph_file(tmp_path_factory):
    """16 synthetic 32px glyphs (the tiny teacher's size): a bar whose place depends on the caption."""
    images = np.full((16, 32, 32), 255, np.uint8)
    for i in range(16):
        images[i, 4:28, 4 + 6 * (i % 4) : 8 + 6 * (i % 4)] = 0
    captions = np.array([["metal; gold", "water; river", "wood; tree", "fire; flame"][i % 4] for i in range(16)])
    path = tmp_path_factory.mktemp("data") / "glyphs.npz"
    save_glyph_set(GlyphSet(images, captions, np.arange(16, dtype=np.int32) + 0x4E00, np.full(16, 167, np.int16)), path)
    return path


def inputs(model, batch=3, length=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.image_shape, generator=gen)
    text = torch.randn(batch, length, model.unet.config.cross_attention_dim, generator=gen)
    return x, text, torch.ones(batch, length, dtype=torch.long)


def test_the_student_starts_as_the_teachers_conditional_prediction(model):
    student = student_unet(model.unet, seed=0)
    assert student.config.class_embed_type == "timestep"
    assert not student.class_embedding.linear_2.weight.any() and student.class_embedding.linear_1.weight.any()
    x, text, mask = inputs(model)
    t = torch.tensor([999, 500, 3])
    with torch.no_grad():
        expected = run_unet(model.unet, x, t, text, mask)
        for g in (1.0, 4.0, 9.5):
            got = run_unet(student, x, t, text, mask, class_labels=guidance_labels(g, 3, "cpu"))
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_guidance_is_learnt_where_the_engine_guides(model):
    """The student's target follows the engine's rule for the teacher's guidance interval."""
    teacher = replace(model, guidance_interval=(0.5, 20.0))
    table = guided_table(teacher)
    coefficients = get_sampler("dpmpp-2m").coefficients(teacher.alphas_cumprod, 20, SamplerConfig())
    assert {c.timestep for c in coefficients if table[c.timestep]} == guided_timesteps(coefficients, (0.5, 20.0))
    assert table[500] and not table[999] and not table[5]
    assert guided_table(model).all()  # no interval: every step


def test_the_guidance_target_is_the_engines_guided_prediction(model):
    teacher = replace(model, guidance_interval=(0.5, 20.0))  # guided at t = 500 (sigma 3.4), not at 999 (157)
    backend = TorchBackend(teacher, "cpu", "fp32")
    text, mask = encode_prompts(teacher, backend, ["metal", "water; river", "fire"])
    uncond = unconditional_text(teacher, backend, text[:1])
    x = inputs(teacher)[0]
    t, g = torch.tensor([500, 999, 500]), torch.tensor([4.0, 4.0, 2.5])
    with torch.no_grad():
        got = teacher_guided_eps(teacher.unet, x, t, text, mask, g, guided_table(teacher), uncond)
    for row in range(3):
        step = int(t[row])
        eps_cond = backend.denoise(x[row : row + 1], step, text[row : row + 1], mask[row : row + 1])
        eps_uncond = backend.denoise(x[row : row + 1], step, *uncond) if step == 500 else None
        # The engine's step with x0 = eps (x_scale 0, eps_scale -1) and x_next = x0 reads out its guided eps.
        readout = StepCoefficients(step, x_scale=0.0, eps_scale=-1.0, a=0.0, b=1.0)
        expected, _ = dpmpp_step(x[row : row + 1], eps_cond, eps_uncond, (), readout, float(g[row]))
        torch.testing.assert_close(got[row : row + 1], expected, rtol=1e-4, atol=1e-5)


def test_training_noise_is_plain_even_for_a_teacher_that_samples_from_centred_noise(model, glyph_file):
    """Centred noise would make every noised image's mean alpha_t x exactly, a brightness cue
    generation (mean 0) never gives: a student trained on it drew grey pages."""

    model.center_noise = True
    distiller = Distiller(model, load_glyph_set(glyph_file), replace(TINY, batch_size=16), torch.device("cpu"))
    means = distiller.batch(0, 0).noise.mean(dim=(1, 2, 3))
    # Plain N(0, 1) over 32x32 pixels: the means spread by 1/32; centred they would all be 0.
    assert means.abs().max() > 0.01 and 0.5 / 32 < means.std() < 2 / 32


def test_a_guidance_step_lowers_the_loss_against_the_guided_teacher(model, glyph_file):

    config = replace(TINY, learning_rate=1e-3)
    distiller = Distiller(model, load_glyph_set(glyph_file), config, torch.device("cpu"))
    state = new_state(config, model.sha256, student_unet(model.unet, 0))
    # The same batch every time: a function of (seed, stage, step).
    before = distiller.guidance_loss(state.student, distiller.batch(0, 0)).item()
    for _ in range(3):
        loss = distiller.guidance_loss(state.student, distiller.batch(0, 0))
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
    after = distiller.guidance_loss(state.student, distiller.batch(0, 0)).item()
    assert before > 0 and after < 0.9 * before
    fresh_optimizer(state)  # a stage's start: nothing of the old optimizer is kept
    assert not state.optimizer.state


@pytest.mark.parametrize("clamp", [None, (0.0, 1.0)], ids=["no-clamp", "clamp"])
def test_one_student_step_to_the_target_lands_where_two_teacher_steps_do(model, clamp):
    """Exact algebra on the engine's own steps (`sampler.dpmpp_step`, order 1), every step of a 4-step student."""
    abar = model.alphas_cumprod
    mine, theirs = StepTable.of(abar, 4), StepTable.of(abar, 8)
    student = get_sampler("dpmpp-2m").coefficients(abar, 4, STUDENT_SAMPLER)
    teacher = get_sampler("dpmpp-2m").coefficients(abar, 8, STUDENT_SAMPLER)
    assert [c.timestep for c in student] == mine.timestep.tolist() == theirs.timestep[::2].tolist()

    def teacher_eps(x, t):  # any deterministic prediction, each row at its own timestep
        return 0.9 * x.flip(-1) + t.view(-1, 1, 1, 1) / 1000

    def teacher_step(x, k):
        return ddim_step(x, teacher_eps(x, theirs.timestep[k]), theirs, k, clamp)

    z = 3 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    i = torch.arange(4)
    target = progressive_target(teacher_step, z, i, mine, theirs, clamp)
    for row in range(4):
        x = z[row : row + 1]
        for k in (2 * row, 2 * row + 1):
            eps = teacher_eps(x, torch.tensor([teacher[k].timestep]))
            x, _ = dpmpp_step(x, eps, None, (), teacher[k], 1.0, clamp)
        coef, got = student[row], target[row : row + 1]
        exact = (x - coef.a * z[row : row + 1]) / coef.b  # x_next = a z + b x0, solved for x0
        torch.testing.assert_close(got, exact if clamp is None else exact.clamp(*clamp), rtol=1e-5, atol=1e-4)
        # The student's one step, with the eps whose x0 is the target, lands on the teacher's two.
        eps = (coef.x_scale * z[row : row + 1] - got) / coef.eps_scale
        one, _ = dpmpp_step(z[row : row + 1], eps, None, (), coef, 1.0, clamp)
        inside = clamp is None or bool(exact.ge(clamp[0]).all() and exact.le(clamp[1]).all())
        if inside:
            torch.testing.assert_close(one, x, rtol=1e-5, atol=1e-4 * max(1.0, coef.x_scale))


def singlestep_scheduler():
    from diffusers import DPMSolverSinglestepScheduler

    return DPMSolverSinglestepScheduler(
        num_train_timesteps=1000,
        solver_order=2,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )  # its timesteps are linspace's, as the engine's default


def rowwise_toy_eps(x, t):
    return torch.cat([toy_eps(x[r : r + 1], int(t[r])) for r in range(len(x))])


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16])
def test_the_first_halvings_teacher_takes_diffusers_singlestep_dpm_solver_steps(steps):
    """N midpoint steps are diffusers' DPMSolverSinglestepScheduler(solver_order=2) at 2N steps."""
    scheduler = singlestep_scheduler()
    table = MidpointTable.of(scheduler.alphas_cumprod.numpy(), steps)
    scheduler.set_timesteps(2 * steps)
    assert scheduler.timesteps.tolist() == table.halves.timestep.tolist()
    x = initial_noise([5, 6, 7], (1, 8, 8))
    ours, ref = x.clone(), x.clone()
    for k in range(steps):
        ours, _ = table.step(rowwise_toy_eps, ours, torch.full((3,), k), None)
    for t in scheduler.timesteps:
        ref = scheduler.step(toy_eps(ref, int(t)), t, ref).prev_sample
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-4)
    assert 0 < ours.min() and ours.max() < 1 and (ours - x).abs().mean() > 0.5  # drawn to the toy's x0 in [0, 1]


@pytest.mark.parametrize("clamp", [None, (0.0, 1.0)], ids=["no-clamp", "clamp"])
def test_one_student_step_to_the_first_halvings_target_lands_where_two_midpoint_steps_do(clamp):
    abar = singlestep_scheduler().alphas_cumprod.numpy()
    mine, midpoints = StepTable.of(abar, 4), MidpointTable.of(abar, 8)
    z = initial_noise([1, 2, 3, 4], (1, 8, 8))
    i = torch.arange(4)
    target = progressive_target(
        lambda x, k: midpoints.step(rowwise_toy_eps, x, k, clamp), z, i, mine, midpoints.steps, clamp
    )
    x = z
    for k in (2 * i, 2 * i + 1):
        x, _ = midpoints.step(rowwise_toy_eps, x, k, clamp)
    one = mine.rows("a", i, z) * z + mine.rows("b", i, z) * target
    torch.testing.assert_close(one, x, rtol=0, atol=1e-4)
    if clamp is not None:
        assert target.min() >= 0 and target.max() <= 1


def test_the_first_halving_learns_from_the_guided_teacher_and_later_ones_from_the_halving_before(model, glyph_file):
    """The first halving's target comes from the guided teacher's 2S steps (4 passes, unconditional
    rows where the engine guides), a later halving's from the previous student (2 passes)."""

    teacher = replace(model, guidance_interval=(0.5, 20.0))
    distiller = Distiller(teacher, load_glyph_set(glyph_file), TINY, torch.device("cpu"))
    calls = []

    def spy(unet, name):
        unet.register_forward_pre_hook(lambda _, args, kwargs: calls.append((name, len(args[0]))), with_kwargs=True)

    spy(distiller.teacher_unet, "teacher")
    previous = student_unet(teacher.unet, 0).eval()
    spy(previous, "previous")
    student = student_unet(teacher.unet, 0)
    batch = distiller.batch(1, 0)
    distiller.progressive_loss(student, None, batch, 2)
    first = [c for c in calls if c[0] == "teacher"]
    assert len(first) == 4 and not [c for c in calls if c[0] == "previous"]
    assert any(rows > TINY.batch_size for _, rows in first)  # some passes carry the unconditional rows
    calls.clear()
    distiller.progressive_loss(student, previous, distiller.batch(2, 0), 1)
    assert [c for c in calls if c[0] != "previous"] == [] and [rows for _, rows in calls] == [4, 4]


def test_the_balanced_weighting_divides_each_steps_mse_by_its_running_mean(model, glyph_file):
    from glyph_engine.training.distill import update_step_scale

    scale = torch.full((3,), float("nan"))
    update_step_scale(scale, torch.tensor([0, 0, 1]), torch.tensor([1.0, 3.0, 5.0]), decay=0.5)
    assert scale[:2].tolist() == [2.0, 5.0] and scale[2].isnan()  # a step's first batch sets its mean
    update_step_scale(scale, torch.tensor([0]), torch.tensor([4.0]), decay=0.5)
    assert scale[:2].tolist() == [3.0, 5.0]  # only the drawn step moves

    # On a step's first batch its mean is the batch's, so the balanced loss is exactly 1.
    distiller = Distiller(model, load_glyph_set(glyph_file), TINY, torch.device("cpu"))
    student, running = student_unet(model.unet, 0), torch.full((2,), float("nan"))
    balanced = distiller.progressive_loss(student, None, distiller.batch(1, 0), 2, running)
    snr = distiller.progressive_loss(student, None, distiller.batch(1, 0), 2)
    assert balanced.item() == pytest.approx(1.0, rel=1e-5) and running[~running.isnan()].gt(0).all()
    assert snr.item() != pytest.approx(1.0, rel=1e-3)


def test_settings_saved_before_the_step_weighting_keep_the_snr_weighting():
    saved = json.loads(TINY.to_json())
    del saved["step_weighting"]
    assert DistillConfig.from_json(json.dumps(saved)) == replace(TINY, step_weighting="snr")
    assert DistillConfig().step_weighting == "balanced"
    with pytest.raises(GlyphEngineError, match="--step-weighting must be one of balanced, snr"):
        replace(TINY, step_weighting="eps").validate()


def test_settings_saved_before_the_x0_loss_keep_the_unclamped_mse():
    saved = json.loads(TINY.to_json())
    del saved["x0_loss"], saved["rollout_share"]
    assert DistillConfig.from_json(json.dumps(saved)) == replace(TINY, x0_loss="mse", rollout_share=0.0)
    assert DistillConfig().x0_loss == "clamped"
    with pytest.raises(GlyphEngineError, match="--x0-loss must be one of clamped, mse"):
        replace(TINY, x0_loss="l1").validate()


def test_settings_saved_before_the_lr_schedule_keep_a_constant_rate():
    saved = json.loads(TINY.to_json())
    del saved["lr_schedule"]
    assert DistillConfig.from_json(json.dumps(saved)) == replace(TINY, lr_schedule="constant")
    with pytest.raises(GlyphEngineError, match="--lr-schedule must be one of constant, cosine"):
        replace(TINY, lr_schedule="linear").validate()


def test_the_cosine_rate_follows_torchs_cosine_annealing_after_the_warm_up():
    config = DistillConfig(learning_rate=1e-4, warmup_steps=10, lr_schedule="cosine")
    stage_steps = 50
    warm = [config.learning_rate_at(step, stage_steps) for step in range(10)]
    assert warm == [replace(config, lr_schedule="constant").learning_rate_at(s, stage_steps) for s in range(10)]
    assert warm[-1] == pytest.approx(1e-4) and warm[0] == pytest.approx(1e-5)
    # Reference: torch's CosineAnnealingLR over the steps after the warm-up, down to 0.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-4)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=stage_steps - 10, eta_min=0.0)
    for step in range(10, stage_steps):
        assert config.learning_rate_at(step, stage_steps) == pytest.approx(reference.get_last_lr()[0], rel=1e-9)
        optimizer.step()
        reference.step()
    assert 0 < config.learning_rate_at(stage_steps - 1, stage_steps) < 1e-6
    constant = replace(config, lr_schedule="constant")
    assert {constant.learning_rate_at(step, stage_steps) for step in range(10, stage_steps)} == {1e-4}


def test_the_clamped_error_costs_nothing_where_the_sampler_clamps_x0_onto_the_target():
    # White page (1), ink (0) and a grey (0.5) target; the last target meets the bound up to rounding.
    target = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 1.0 - 1e-7])
    x0 = torch.tensor([1.3, 0.9, -0.2, 0.1, 1.3, 0.4, 1.2], requires_grad=True)
    error = clamped_error(x0, target, (0.0, 1.0))
    expected = torch.tensor([0.0, -0.1, 0.0, 0.1, 0.8, -0.1, 1e-7])
    torch.testing.assert_close(error.detach(), expected, rtol=0, atol=1e-6)
    error.pow(2).sum().backward()
    # Beyond the bound its target lies on, x0 is left alone; beyond one it does not lie on
    # (grey target), it is pulled back; short of white, it is pulled up.
    assert x0.grad[0] == 0 and x0.grad[2] == 0 and x0.grad[6] == 0
    assert x0.grad[4] > 0 and x0.grad[1] < 0 and x0.grad[3] > 0
    torch.testing.assert_close(clamped_error(x0, target, None), x0 - target, rtol=0, atol=0)


def test_the_clamped_x0_loss_drops_only_what_the_clamp_removes(model, glyph_file):
    glyphs = load_glyph_set(glyph_file)
    student = student_unet(model.unet, 0)
    with torch.no_grad():  # a student whose x0 overshoots the page and the ink
        student.conv_out.bias.add_(0.5)

    def loss(teacher, x0_loss):
        distiller = Distiller(teacher, glyphs, replace(TINY, x0_loss=x0_loss), torch.device("cpu"))
        return distiller.progressive_loss(student, None, distiller.batch(1, 0), 2).item()

    clamping = replace(model, clamp_x0=True)
    assert loss(clamping, "clamped") < loss(clamping, "mse")
    assert loss(model, "clamped") == loss(model, "mse")  # a teacher that does not clamp: no bound


def test_a_rollout_stands_where_the_engines_sampler_takes_the_student(model, glyph_file):
    """Each row at its own step, from generation's centred noise, against `sampler.sample_dpmpp` at order 1."""
    teacher = replace(model, center_noise=True, clamp_x0=True)
    distiller = Distiller(teacher, load_glyph_set(glyph_file), TINY, torch.device("cpu"))
    student = student_unet(model.unet, 0).eval()
    with torch.no_grad():  # a guidance input that matters
        student.class_embedding.linear_2.weight.normal_(0, 0.02)
    b, i = distiller.batch(1, 0), torch.tensor([0, 3, 1, 2])
    start = torch.from_numpy(copy.deepcopy(b.rng).standard_normal(tuple(b.x0.shape), dtype=np.float32))
    start -= start.mean(dim=(1, 2, 3), keepdim=True)
    got = distiller.rollout(student, b, i, 4)
    coefficients = get_sampler("dpmpp-2m").coefficients(teacher.alphas_cumprod, 4, STUDENT_SAMPLER)
    labels = guidance_labels(b.guidance, len(b.guidance), "cpu")
    assert torch.equal(got[0], start[0])  # step 0 is generation's noise itself
    for row, steps in enumerate(i.tolist()[1:], start=1):
        r = slice(row, row + 1)

        def predict(x, t, r=r):
            eps = run_unet(student, x, torch.tensor([t]), b.text[r], b.mask[r], class_labels=labels[r])
            return eps, None

        with torch.no_grad():
            expected = sample_dpmpp(predict, start[r], coefficients[:steps], clamp=teacher.pixel_range)
        torch.testing.assert_close(got[r], expected, rtol=1e-4, atol=1e-4)


def test_the_rollout_share_of_a_halving_batch_starts_from_the_students_own_steps(model, glyph_file, monkeypatch):
    glyphs, student, calls = load_glyph_set(glyph_file), student_unet(model.unet, 0), []
    real = Distiller.rollout

    def counted(self, student, b, i, steps):
        calls.append(len(i))
        return real(self, student, b, i, steps)

    monkeypatch.setattr(Distiller, "rollout", counted)
    for share, rows in ((0.0, None), (0.5, 2), (1.0, 4)):
        distiller = Distiller(model, glyphs, replace(TINY, rollout_share=share), torch.device("cpu"))
        distiller.progressive_loss(student, None, distiller.batch(1, 0), 2)
        assert calls.pop() == rows if rows else not calls
    with pytest.raises(GlyphEngineError, match="--rollout-share must be between 0 and 1"):
        replace(TINY, rollout_share=1.5).validate()


def test_stages_need_nested_timesteps():
    assert [s.name for s in stages(DistillConfig())] == ["guidance", "8 steps"]
    assert [s.name for s in stages(DistillConfig(guidance_steps=0))] == ["8 steps"]
    assert [s.student_steps for s in stages(DistillConfig(start_steps=32, final_steps=1))] == [None, 16, 8, 4, 2, 1]
    abar = np.linspace(0.9999, 0.0001, 1000)
    check_nested(StepTable.of(abar, 4), StepTable.of(abar, 8))
    with pytest.raises(GlyphEngineError, match="do not contain its 4-step ones"):
        check_nested(StepTable.of(abar, 4), StepTable.of(abar, 6))
    for bad in (DistillConfig(start_steps=12, final_steps=4), DistillConfig(start_steps=4, final_steps=4)):
        with pytest.raises(GlyphEngineError, match="--start-steps must be --final-steps times a power of two"):
            bad.validate()


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(ckpt_path, glyph_file, tmp_path):
    _, whole = distill(ckpt_path, glyph_file, tmp_path / "whole", TINY, max_steps=3)
    assert whole.stage == len(stages(TINY)) and [len(s) for s in whole.losses] == [1, 1]
    # Out of time before the first step: nothing is trained or written.
    _, none = distill(ckpt_path, glyph_file, tmp_path / "parts", TINY, minutes=1e-9)
    assert none.steps_done() == 0 and not (tmp_path / "parts" / STATE).exists()
    # Stopped inside the guidance stage, then resumed across the stage's end.
    _, part = distill(ckpt_path, glyph_file, tmp_path / "parts", TINY, max_steps=1)
    assert (part.stage, part.step) == (0, 1) and (tmp_path / "parts" / STATE).is_file()
    _, part = distill(ckpt_path, glyph_file, tmp_path / "parts", None, max_steps=3)
    assert part.stage == whole.stage
    for a, b in zip(whole.student.state_dict().values(), part.student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name in ("student-guidance.pt", "student-1-steps.pt"):
        assert (tmp_path / "parts" / name).is_file()
    with pytest.raises(GlyphEngineError, match=r"other settings \(--batch-size 4\)"):
        distill(ckpt_path, glyph_file, tmp_path / "parts", replace(TINY, batch_size=8), max_steps=3)


def test_a_run_resumed_inside_a_halving_keeps_its_step_weights(ckpt_path, glyph_file, tmp_path):
    config = replace(TINY, stage_steps=3)
    _, whole = distill(ckpt_path, glyph_file, tmp_path / "whole", config, max_steps=4)
    distill(ckpt_path, glyph_file, tmp_path / "parts", config, max_steps=3)  # one step into the halving
    saved = torch.load(tmp_path / "parts" / STATE, weights_only=True)["step_scale"]
    assert saved.shape == (1,) and saved.isfinite().all()
    _, part = distill(ckpt_path, glyph_file, tmp_path / "parts", None, max_steps=4)
    assert (part.stage, part.step) == (whole.stage, whole.step) == (1, 2)
    torch.testing.assert_close(part.step_scale, whole.step_scale, rtol=0, atol=0)
    for a, b in zip(whole.student.state_dict().values(), part.student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_halving_trains_at_the_scheduled_rate(ckpt_path, glyph_file, tmp_path, monkeypatch):
    config = replace(TINY, stage_steps=4, lr_schedule="cosine")
    rates = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    distill(ckpt_path, glyph_file, tmp_path / "run", config, max_steps=6)
    # Two guidance steps, then four of the halving: one of warm-up, then down the cosine.
    expected = [config.learning_rate_at(s, 2) for s in range(2)] + [config.learning_rate_at(s, 4) for s in range(4)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[2] == rates[3] == config.learning_rate and rates[3] > rates[4] > rates[5] > 0


def cli_distill(*args):
    return CliRunner().invoke(app, ["distill", *map(str, args)])


TINY_OPTIONS = ["--batch-size", 4, "--guidance-steps", 1, "--stage-steps", 1, "--start-steps", 2, "--final-steps", 1]


@pytest.mark.slow  # about 21 s (a whole distill and a gated eval): in `make test-slow`, which CI runs too
def test_the_cli_writes_a_student_that_loads_with_its_sampling_defaults(ckpt_path, glyph_file, tmp_path):
    from glyph_engine.checkpoint import load_model
    from glyph_engine.pipeline import generate

    out, workdir = tmp_path / "student.pt", tmp_path / "run"
    result = cli_distill(ckpt_path, "-o", out, "--data", glyph_file, "--workdir", workdir, "--steps", 1, *TINY_OPTIONS)
    assert result.exit_code == 0, result.output
    assert "stage 2/2 (1 steps): step 0/1" in result.output and not out.exists()
    result = cli_distill(ckpt_path, "-o", out, "--data", glyph_file, "--workdir", workdir, "--minutes", 5)
    assert result.exit_code == 0, result.output
    assert "a 1-step student" in result.output
    student, teacher = load_model(out), load_model(ckpt_path)
    assert student.guidance_embedding and not teacher.guidance_embedding
    assert (student.default_steps, student.default_sampler, student.default_order) == (1, "dpmpp-2m", 2)
    assert student.default_guidance == teacher.default_guidance and student.guidance_interval is None
    assert (student.clamp_x0, student.center_noise) == (teacher.clamp_x0, teacher.center_noise)
    card = json.loads(out.with_suffix(".card.json").read_text())
    assert card["sha256"] == student.sha256 and card["default_steps"] == 1
    images = generate(student, TorchBackend(student, "cpu", "fp32"), ["metal"], 2).images
    assert images.shape == (2, *teacher.image_shape) and torch.isfinite(images).all()

    # The gate evaluates both, each at its own defaults, and says so in its exit code.
    gated = CliRunner().invoke(
        app, ["eval", "--data", str(glyph_file), "--ckpt", str(out), "--against", str(ckpt_path), "-n", "2"]
    )
    assert gated.exit_code == (0 if "the student passes the gate" in gated.output else 1), gated.output
    assert "dpmpp-2m order 2, linspace, 1 steps" in gated.output  # the student's defaults
    assert f"dpmpp-2m order 2, linspace, {DEFAULT_STEPS} steps" in gated.output  # the teacher's
    assert gated.output.count("\n- ") == 4 and "Caption gain" in gated.output


def flip_middle(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 400] = bytes(b ^ 0xFF for b in data[middle : middle + 400])
    path.write_bytes(data)


def drop_optimizer(path):
    payload = torch.load(path, weights_only=True)
    del payload["optimizer"]
    torch.save(payload, path)


@pytest.mark.parametrize(
    "damage",
    [flip_middle, lambda p: p.write_bytes(p.read_bytes()[:5000]), drop_optimizer],
    ids=["flipped", "truncated", "incomplete"],
)
def test_a_damaged_state_is_refused_in_one_line(ckpt_path, glyph_file, tmp_path, damage):
    workdir = tmp_path / "run"
    distill(ckpt_path, glyph_file, workdir, TINY, max_steps=1)
    damage(workdir / STATE)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    result = cli_distill(ckpt_path, "--data", glyph_file, "--workdir", workdir, "--steps", 2, "-o", tmp_path / "s.pt")
    assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1
    assert f"{workdir / STATE} is damaged or incomplete" in result.output and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_a_state_of_the_first_format_is_refused_in_one_line(ckpt_path, glyph_file, tmp_path):
    """Its first halving learnt from the guidance stage's student: it cannot go on as started."""
    workdir = tmp_path / "run"
    distill(ckpt_path, glyph_file, workdir, TINY, max_steps=1)
    payload = torch.load(workdir / STATE, weights_only=True)
    torch.save({**payload, "format": "glyph-engine-distill-state"}, workdir / STATE)
    result = cli_distill(ckpt_path, "--data", glyph_file, "--workdir", workdir, "--steps", 2, "-o", tmp_path / "s.pt")
    assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "was started by an older glyph-engine" in result.output and "new --workdir" in result.output


@pytest.mark.parametrize("command", ["distill", "train"])
def test_a_second_run_on_a_busy_workdir_is_refused_in_one_line(ckpt_path, glyph_file, tmp_path, command):
    """Two runs on one workdir would overwrite each other's state: the second stops at once."""
    from glyph_engine.files import working_in

    workdir = tmp_path / "run"
    args = ["--data", glyph_file, "--workdir", workdir, "--steps", 1] if command == "distill" else []
    with working_in(workdir, command):  # the first run, still going
        if command == "distill":
            result = cli_distill(ckpt_path, *args, "-o", tmp_path / "s.pt")
        else:
            train = ["train", "--data", str(glyph_file), "--workdir", str(workdir), "--steps", "1"]
            result = CliRunner().invoke(app, train)
        assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1
        assert f"another `glyph-engine {command}` is running in {workdir}" in result.output
        assert list(workdir.iterdir()) == []  # nothing written
    with working_in(workdir, command):  # free again once the first ends
        pass


def test_a_snapshot_writes_the_running_stages_averaged_weights_and_leaves_the_run_alone(
    ckpt_path, glyph_file, tmp_path
):
    from glyph_engine.checkpoint import load_model
    from glyph_engine.files import working_in
    from glyph_engine.training.distill_state import load_state

    workdir, out = tmp_path / "run", tmp_path / "snapshot.pt"
    result = cli_distill(ckpt_path, "--workdir", workdir, "--snapshot", out)
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "holds no distillation" in result.output
    assert not out.exists()

    # Guidance stage, step 2 of 3: diffusers' average copies the first step's weights, then moves slower.
    distill(ckpt_path, glyph_file, workdir, replace(TINY, guidance_steps=3), max_steps=2)
    before = (workdir / STATE).read_bytes()
    with working_in(workdir, "distill"):  # a run going on in the workdir
        result = cli_distill(ckpt_path, "--workdir", workdir, "--snapshot", out)
    assert result.exit_code == 0, result.output
    assert "stage 'guidance' at step 2/3" in result.output and f"--against {ckpt_path}" in result.output
    assert (workdir / STATE).read_bytes() == before

    teacher = load_model(ckpt_path)
    state = load_state(workdir, teacher.sha256, student_unet(teacher.unet, 0), None)
    raw = [p.detach().clone() for p in state.student.parameters()]
    state.ema.copy_to(state.student.parameters())
    snap = load_model(out)
    assert snap.guidance_embedding and snap.metadata["snapshot"] == "averaged weights at step 2 of 3"
    written = dict(snap.unet.named_parameters())
    moved = False
    for (name, averaged), trained in zip(state.student.named_parameters(), raw, strict=True):
        torch.testing.assert_close(written[name].float(), averaged, rtol=1e-3, atol=1e-4)  # stored in fp16
        moved |= not torch.allclose(averaged, trained)
    assert moved  # the average is not the raw weights, so the check above tells them apart

    distill(ckpt_path, glyph_file, workdir, None, minutes=5)
    result = cli_distill(ckpt_path, "--workdir", workdir, "--snapshot", tmp_path / "late.pt")
    assert result.exit_code == 2 and "every stage in" in result.output and not (tmp_path / "late.pt").exists()
