"""Distilling a glyffuser into a few-step, guidance-free student (`glyph-engine distill`).

Stages, run in order and resumable across runs (`distill_state.py`):
1. guidance distillation (Meng et al., "On Distillation of Guided Diffusion Models", CVPR
   2023): the student takes the guidance scale as an input (the U-Net's class embedding,
   fed `model.guidance_labels`) and learns, in one pass, the teacher's guided noise
   prediction exactly as the engine's sampler combines it: the teacher's guidance interval
   and unconditional rows included;
2. progressive distillation (Salimans & Ho, ICLR 2022): each stage halves the step count,
   one DDIM step of the student matching two steps of its teacher: in the first halving the
   guided teacher itself taking single-step DPM-Solver++(2S) steps (`MidpointTable`), in
   later ones the previous stage's student taking DDIM steps.
DDIM is first-order DPM-Solver++, and every stage trains at the timesteps and with the step
coefficients the engine's `dpmpp-2m` sampler uses at order 1, so the student runs through
the engine's sampler and its fused step unchanged, at exactly the timesteps it learnt. It
samples them at order 2 by default (DPM-Solver++(2M) on its own x0 predictions,
`STUDENT_SAMPLING_ORDER`: measured to draw cleaner pages than order 1).
The training images are the glyph dataset's, noised; the text encoder and tokenizer are
the teacher's, frozen.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from torch import Tensor
from tqdm import tqdm

from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.checkpoint import load_model, save_checkpoint
from glyph_engine.cpu import cpu_info
from glyph_engine.errors import GlyphEngineError
from glyph_engine.model import Glyffuser, guidance_labels
from glyph_engine.pipeline import encode_prompts, unconditional_text
from glyph_engine.sampler import centred
from glyph_engine.settings import Precision
from glyph_engine.training.dataset import GlyphSet, load_glyph_set
from glyph_engine.training.distill_config import DistillConfig, Stage, stages
from glyph_engine.training.distill_state import (
    STATE,
    DistillState,
    fresh_optimizer,
    frozen_copy,
    load_state,
    new_state,
    save_state,
)
from glyph_engine.training.distill_targets import (
    STUDENT_SAMPLER,
    STUDENT_SAMPLING_ORDER,
    MidpointTable,
    StepTable,
    check_nested,
    clamped_error,
    ddim_step,
    guided_table,
    predicted_x0,
    progressive_target,
    run_unet,
    teacher_guided_eps,
)
from glyph_engine.training.train import sample_captions

logger = logging.getLogger(__name__)


def student_unet(teacher: UNet2DConditionModel, seed: int) -> UNet2DConditionModel:
    """The teacher's U-Net with a guidance input, predicting exactly what the teacher does.

    diffusers' `class_embed_type="timestep"` embeds the class label with the timestep's own
    sinusoidal features and adds it to the time embedding; its last layer starts at zero, so
    the student starts as the teacher's conditional prediction at every guidance scale.
    """
    torch.manual_seed(seed)  # the class embedding's first layer, the only new random weights
    student = UNet2DConditionModel.from_config({**teacher.config, "class_embed_type": "timestep"})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not name.startswith("class_embedding.") for name in missing):
        raise GlyphEngineError(f"the teacher's U-Net does not fit its own config ({(missing + unexpected)[:3]}).")
    with torch.no_grad():
        student.class_embedding.linear_2.weight.zero_()
        student.class_embedding.linear_2.bias.zero_()
    return student.float().train()


@dataclass
class Batch:
    x0: Tensor  # (B, C, H, W) in the teacher's pixel range
    noise: Tensor  # like x0; centred per image where the teacher's sampling centres its noise
    text: Tensor  # (B, L, D), the teacher's encoding of each caption
    mask: Tensor  # (B, L)
    guidance: Tensor  # (B,) the scale each row learns
    uncond: tuple[Tensor, Tensor]  # the teacher's unconditional (1, L, D) text and (1, L) mask
    rng: np.random.Generator  # this step's, for the stage's own draws (timesteps)

    def rows(self, n: int) -> Batch:
        """The first n rows (the same generator)."""
        return Batch(
            self.x0[:n], self.noise[:n], self.text[:n], self.mask[:n], self.guidance[:n], self.uncond, self.rng
        )


class Distiller:
    """What every training step needs: the teacher, its encoder, the data, the device."""

    def __init__(self, teacher: Glyffuser, glyphs: GlyphSet, config: DistillConfig, device: torch.device):
        self.teacher, self.config, self.device = teacher, config, device
        self.encoder = TorchBackend(teacher, device, Precision.fp32, cuda_graphs=False)
        low, high = teacher.pixel_range
        self.images = torch.from_numpy(glyphs.images).float().div_(255).mul_(high - low).add_(low).unsqueeze(1)
        self.captions = [str(c) for c in glyphs.captions]
        self.guidance_bounds = config.guidance_bounds(teacher.default_guidance)
        self.clamp = teacher.pixel_range if teacher.clamp_x0 else None
        self.abar = torch.tensor(teacher.alphas_cumprod, dtype=torch.float32)
        self.guided = guided_table(teacher)
        # The guided teacher (guidance stage, first halving).
        self.teacher_unet = self.encoder.unet.requires_grad_(False).eval()
        # The teacher's passes run in bf16 where the hardware computes in it (a GPU, a CPU with
        # BF16 units; emulated bf16 is slower than fp32), and so does the guidance stage's
        # student: its loss is on eps, where bf16's 0.4% rounding is far below the loss. For the
        # first halving's x0 targets, bf16 passes of the guided teacher move an 8-step student's
        # target by 0.04-0.09 RMS (pixels in [0, 1]) at its first four steps, where the target
        # weighs 1-15% in the step's x, and by 0.001-0.02 at the last four (measured); a step
        # takes 4.3 s instead of 6.5 s in fp32 (a 2-core Xeon). The later halvings' teachers
        # (earlier students) and every student being trained stay in fp32: bf16 trained no
        # faster here.
        self.bf16 = device.type == "cuda" or cpu_info().has_bf16
        self._tables: dict[int, tuple[StepTable, StepTable]] = {}
        self._midpoints: dict[int, MidpointTable] = {}

    def autocast(self) -> AbstractContextManager:
        """The precision of the guided teacher's passes and the guidance stage's student (see `bf16`)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def batch(self, stage: int, step: int) -> Batch:
        """This step's images, captions, noise and guidance: a function of (seed, stage, step)
        alone, so a resumed run draws what an uninterrupted one would."""
        rng = np.random.default_rng([self.config.seed, stage, step])
        idx = rng.choice(len(self.captions), self.config.batch_size, replace=False)
        captions = sample_captions([self.captions[i] for i in idx], self.config.clause_sampling, rng)
        x0 = self.images[idx].to(self.device)
        # Plain Gaussian noise, as the teacher was trained, never centred: a data image noised
        # with centred noise has a mean of exactly alpha_t x (its own), so every training
        # input tells its image's brightness, while generation starts from centred noise
        # (mean 0) that no training image gave. A 16-step student trained that way read its
        # brightness from the mean and drew 32 of 32 "fire" glyphs on a grey page from centred
        # noise, 6 of 32 from noise shifted by +0.01 (measured). Plain noise spreads the mean
        # by sigma_t / 32 around alpha_t x, so generation's 0 lies inside what training shows.
        noise = torch.from_numpy(rng.standard_normal(x0.shape, dtype=np.float32)).to(self.device)
        low, high = self.guidance_bounds
        guidance = torch.from_numpy(rng.uniform(low, high, len(idx)).astype(np.float32)).to(self.device)
        text, mask = encode_prompts(self.teacher, self.encoder, captions)
        uncond = unconditional_text(self.teacher, self.encoder, text[:1])
        # Out of inference mode (the encoder runs in it): the student's backward pass saves them.
        return Batch(x0, noise, text.clone(), mask.clone(), guidance, (uncond[0].clone(), uncond[1].clone()), rng)

    def guidance_loss(self, student: UNet2DConditionModel, b: Batch) -> Tensor:
        """Stage 1: the student's one pass against the teacher's guided eps, at any timestep."""
        t = torch.from_numpy(b.rng.integers(0, len(self.abar), len(b.x0))).to(self.device)
        a = self.abar.to(self.device)[t].view(-1, 1, 1, 1)
        z = a.sqrt() * b.x0 + (1 - a).sqrt() * b.noise
        with torch.no_grad(), self.autocast():
            target = teacher_guided_eps(self.teacher_unet, z, t, b.text, b.mask, b.guidance, self.guided, b.uncond)
        with self.autocast():
            eps = run_unet(student, z, t, b.text, b.mask, **self.labels(b))
        return torch.nn.functional.mse_loss(eps, target)

    def progressive_loss(
        self,
        student: UNet2DConditionModel,
        teacher: UNet2DConditionModel | None,
        b: Batch,
        steps: int,
        step_scale: Tensor | None = None,
    ) -> Tensor:
        """Stage 2: the student's x0 at one of its `steps` timesteps against the two-teacher-step
        target. Each sample's MSE is weighted by max(SNR, 1) (Salimans & Ho's truncated SNR
        weighting), or, given `step_scale` (the "balanced" weighting), divided by its step's
        running mean MSE, which this updates with the batch's (so every drawn step has one).

        `teacher` None (the first halving): the guided teacher itself, two DPM-Solver++(2S)
        steps per student step (`MidpointTable`); otherwise the previous stage's student, two
        DDIM steps as it samples."""
        mine, _ = self.tables(steps)
        i = torch.from_numpy(b.rng.integers(0, steps, len(b.x0))).to(self.device)
        z, sigma = self.noised(b, i, steps)
        rollouts = round(self.config.rollout_share * len(z))
        if rollouts:
            z[:rollouts] = self.rollout(student, b.rows(rollouts), i[:rollouts], steps)
        target = self.target(teacher, b, z, i, steps)
        eps = run_unet(student, z, mine.timestep.to(self.device)[i], b.text, b.mask, **self.labels(b))
        x0 = predicted_x0(z, eps, mine, i, None)
        error = clamped_error(x0, target, self.clamp) if self.config.x0_loss == "clamped" else x0 - target
        mse = error.pow(2).mean(dim=(1, 2, 3))
        if step_scale is None:
            return (sigma.flatten().pow(-2).clamp(min=1.0) * mse).mean()  # SNR = 1 / sigma^2
        update_step_scale(step_scale, i, mse.detach())
        return (mse / step_scale[i].clamp(min=1e-12)).mean()

    @torch.no_grad()
    def rollout(self, student: UNet2DConditionModel, b: Batch, i: Tensor, steps: int) -> Tensor:
        """Where the student's own DDIM steps stand at each row's step `i`, from generation's
        start: plain noise, centred per image where the teacher samples from centred noise."""
        mine, _ = self.tables(steps)
        x = torch.from_numpy(b.rng.standard_normal(tuple(b.x0.shape), dtype=np.float32)).to(self.device)
        if self.teacher.center_noise:
            x = centred(x)
        labels, timestep = self.labels(b)["class_labels"], mine.timestep.to(self.device)
        for k in range(int(i.max()) if len(i) else 0):
            live = i > k  # rows still short of their step
            at = torch.full((int(live.sum()),), k, device=self.device)
            eps = run_unet(student, x[live], timestep[at], b.text[live], b.mask[live], class_labels=labels[live])
            x[live] = ddim_step(x[live], eps, mine, at, self.clamp)[0]
        return x

    def noised(self, b: Batch, i: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """The batch's images noised to each row's student step `i`: (z = alpha x0 + sigma eps, sigma / alpha)."""
        mine, _ = self.tables(steps)
        sigma = mine.rows("eps_scale", i, b.x0)
        return (b.x0 + sigma * b.noise) / mine.rows("x_scale", i, b.x0), sigma

    @torch.no_grad()
    def target(self, teacher: UNet2DConditionModel | None, b: Batch, z: Tensor, i: Tensor, steps: int) -> Tensor:
        """The x0 that takes a student step from z where two steps of `teacher` land (see
        `progressive_loss`; None: the guided teacher's 2S steps)."""
        mine, theirs = self.tables(steps)
        if teacher is None:
            midpoints = self.midpoints(2 * steps)

            def guided_eps(x: Tensor, t: Tensor) -> Tensor:
                with self.autocast():
                    return teacher_guided_eps(
                        self.teacher_unet, x, t, b.text, b.mask, b.guidance, self.guided, b.uncond
                    )

            def teacher_step(x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
                return midpoints.step(guided_eps, x, k, self.clamp)
        else:
            labels = self.labels(b)

            def teacher_step(x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
                eps = run_unet(teacher, x, theirs.timestep.to(x.device)[k], b.text, b.mask, **labels)
                return ddim_step(x, eps, theirs, k, self.clamp)

        return progressive_target(teacher_step, z, i, mine, theirs, self.clamp)

    def tables(self, student_steps: int) -> tuple[StepTable, StepTable]:
        """The student's and the teacher's step tables of a stage, checked to nest."""
        if student_steps not in self._tables:
            abar = self.teacher.alphas_cumprod
            mine, theirs = StepTable.of(abar, student_steps), StepTable.of(abar, 2 * student_steps)
            check_nested(mine, theirs)
            self._tables[student_steps] = mine, theirs
        return self._tables[student_steps]

    def midpoints(self, teacher_steps: int) -> MidpointTable:
        if teacher_steps not in self._midpoints:
            self._midpoints[teacher_steps] = MidpointTable.of(self.teacher.alphas_cumprod, teacher_steps)
        return self._midpoints[teacher_steps]

    def labels(self, b: Batch) -> dict[str, Tensor]:
        return {"class_labels": guidance_labels(b.guidance, len(b.guidance), self.device)}


# Of the "balanced" weighting's running means: a batch of 64 draws each of 8 steps about 8
# times, so a mean spans some 800 samples of its step.
STEP_SCALE_DECAY = 0.99


def update_step_scale(scale: Tensor, i: Tensor, mse: Tensor, decay: float = STEP_SCALE_DECAY) -> None:
    """Moves each drawn step's running mean MSE towards this batch's mean for it, in place; a
    step's first batch sets it."""
    for k in i.unique().tolist():
        batch_mean = mse[i == k].mean()
        scale[k] = batch_mean if scale[k].isnan() else decay * scale[k] + (1 - decay) * batch_mean


def _train_step(state: DistillState, distiller: Distiller, stage: Stage) -> float:
    config = state.config
    for group in state.optimizer.param_groups:
        group["lr"] = config.learning_rate_at(state.step, stage.steps)
    b = distiller.batch(state.stage, state.step)
    if stage.student_steps is None:
        loss = distiller.guidance_loss(state.student, b)
    else:
        if config.step_weighting == "balanced" and state.step_scale is None:
            state.step_scale = torch.full((stage.student_steps,), math.nan, device=distiller.device)
        scale = state.step_scale if config.step_weighting == "balanced" else None  # None: snr
        loss = distiller.progressive_loss(state.student, state.stage_teacher, b, stage.student_steps, scale)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = list(state.student.parameters())
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    state.optimizer.step()
    state.ema.step(params)
    return loss.item()


def distill(
    teacher_path: Path,
    dataset: Path,
    workdir: Path,
    config: DistillConfig | None = None,
    max_steps: int | None = None,
    minutes: float | None = None,
    save_every: int = 100,
    progress: bool = False,
    text_encoder: str | None = None,
) -> tuple[Glyffuser, DistillState]:
    """Distils (or resumes distilling) `teacher_path` in `workdir` until every stage is done,
    `max_steps` steps over all stages, or `minutes` of this run; returns the teacher and the
    state. A finished stage leaves its student in `workdir` (`student-guidance.pt`,
    `student-8-steps.pt`, ...): `glyph-engine generate --ckpt` draws it."""
    if config is not None:
        config.validate()
    teacher = load_model(teacher_path, text_encoder)
    if teacher.guidance_embedding:
        raise GlyphEngineError(f"{teacher_path} is already a distilled student; distil its teacher instead.")
    glyphs = load_glyph_set(dataset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = student_unet(teacher.unet, (config or DistillConfig()).seed).to(device)
    if (workdir / STATE).is_file():
        state = load_state(workdir, teacher.sha256, student, config)
        logger.info("resuming at stage %d, step %d", state.stage, state.step)
    else:
        state = new_state(config or DistillConfig(), teacher.sha256, student)
    _check_dataset(glyphs, teacher, state.config, dataset)
    plan = stages(state.config)
    distiller = Distiller(teacher, glyphs, state.config, device)
    halvings = [stage for stage in plan if stage.student_steps is not None]
    for stage in halvings:  # refused now, not after hours of the stages before it
        distiller.tables(stage.student_steps)
    distiller.midpoints(2 * halvings[0].student_steps)
    workdir.mkdir(parents=True, exist_ok=True)

    started, run_start = time.perf_counter(), state.steps_done()
    deadline = started + 60 * minutes if minutes else math.inf
    total = sum(s.steps for s in plan)
    bar = tqdm(total=total, initial=run_start, unit="step", file=sys.stderr, disable=not progress)
    window: list[float] = []
    while state.stage < len(plan):
        stage = plan[state.stage]
        if state.step >= stage.steps:
            window = _log_window(state, window)
            _end_stage(state, teacher, workdir, plan)
            continue
        if (max_steps is not None and state.steps_done() >= max_steps) or time.perf_counter() > deadline:
            break
        bar.set_description(f"distilling: {stage.name} ({state.stage + 1}/{len(plan)})")
        window.append(_train_step(state, distiller, stage))
        state.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(window[-50:]):.4g}")
        if state.step % 50 == 0:
            window = _log_window(state, window)
        if state.step % save_every == 0:
            state.seconds += time.perf_counter() - started
            started = time.perf_counter()
            save_state(state, workdir)
    bar.close()
    _log_window(state, window)  # the steps since the last 50-step mark, so a short run reports a loss
    state.seconds += time.perf_counter() - started
    if state.steps_done() > run_start:
        save_state(state, workdir)
    return teacher, state


def snapshot(teacher_path: Path, workdir: Path, out: Path, text_encoder: str | None = None) -> tuple[Stage, int]:
    """Writes the averaged weights of `workdir`'s stage in progress to `out` as a student, to
    gate it (`eval --against`) before the stage ends; returns the stage and its step. The state
    is only read: a run going on in `workdir` is not disturbed."""
    if not (workdir / STATE).is_file():
        raise GlyphEngineError(f"{workdir} holds no distillation to snapshot ({STATE} is missing).")
    teacher = load_model(teacher_path, text_encoder)
    student = student_unet(teacher.unet, DistillConfig().seed)  # every weight is then the state's
    state = load_state(workdir, teacher.sha256, student, None)
    plan = stages(state.config)
    if state.stage == len(plan):
        raise GlyphEngineError(
            f"every stage in {workdir} is done: its student is the run's --out, and each stage's is in {workdir}."
        )
    stage = plan[state.stage]
    state.ema.copy_to(state.student.parameters())
    card = {"stage": stage.name, "snapshot": f"averaged weights at step {state.step} of {stage.steps}"}
    save_student(state, teacher, stage, out, card)
    return stage, state.step


def _log_window(state: DistillState, window: list[float]) -> list[float]:
    if window:
        state.losses[min(state.stage, len(state.losses) - 1)].append(float(np.mean(window)))
    return []


def _end_stage(state: DistillState, teacher: Glyffuser, workdir: Path, plan: list[Stage]) -> None:
    """The stage's averaged weights become the student (written out) and, after a halving, the
    next halving's teacher (the first halving learns from the guided teacher itself)."""
    stage = plan[state.stage]
    state.ema.copy_to(state.student.parameters())
    out = workdir / f"student-{stage.name.replace(' ', '-')}.pt"
    save_student(state, teacher, stage, out, {"stage": stage.name})
    state.stage, state.step, state.step_scale = state.stage + 1, 0, None
    if state.stage < len(plan):
        state.losses.append([])
        if stage.student_steps is not None:
            if state.stage_teacher is None:
                state.stage_teacher = frozen_copy(state.student)
            else:
                state.stage_teacher.load_state_dict(state.student.state_dict())
        fresh_optimizer(state)
    save_state(state, workdir)


def student_model(teacher: Glyffuser, unet: UNet2DConditionModel, stage: Stage, metadata: dict[str, Any]) -> Glyffuser:
    """The student as the pipeline and the checkpoint writer take it: the teacher's text encoder,
    tokenizer, schedule, pixel range, clamp and noise centring; a guidance input, no guidance
    interval (the teacher's is inside what it learnt); after a progressive stage, its own steps
    (trained at order 1, DDIM; sampled at STUDENT_SAMPLING_ORDER)."""
    few = stage.student_steps is not None
    return replace(
        teacher,
        unet_source=unet,
        guidance_interval=None,
        guidance_embedding=True,
        default_steps=stage.student_steps,
        default_sampler=STUDENT_SAMPLER.name if few else None,
        default_order=STUDENT_SAMPLING_ORDER if few else None,
        sha256="distilling",
        metadata={k: str(v) for k, v in metadata.items()},
    )


def save_student(state: DistillState, teacher: Glyffuser, stage: Stage, out: Path, card: dict[str, Any]) -> str:
    """Writes the student's current weights (FP16, as `train` writes) to `out`; returns its sha256."""
    model = student_model(teacher, state.student, stage, card)
    return save_checkpoint(model, out, dtype=torch.float16)


def _check_dataset(glyphs: GlyphSet, teacher: Glyffuser, config: DistillConfig, dataset: Path) -> None:
    size = teacher.image_shape[1]
    if glyphs.images.shape[1:] != teacher.image_shape[1:]:
        raise GlyphEngineError(
            f"{dataset} has {glyphs.images.shape[1]}px glyphs; the teacher draws {size}px: "
            f"build the dataset with --resolution {size}."
        )
    if len(glyphs) < config.batch_size:
        raise GlyphEngineError(
            f"{dataset} has {len(glyphs)} glyphs, fewer than one batch ({config.batch_size}); "
            "build a larger one with `glyph-engine dataset`, or lower --batch-size."
        )
