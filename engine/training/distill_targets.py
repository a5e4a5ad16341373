"""What a distilled student learns: the teacher's guided noise prediction as the engine's
sampler computes it, and the x0 that makes one student step land where two teacher steps do.

Both are written on the engine's own rules and coefficients (`pipeline.guided_timesteps`,
`schedule` via the sampler registry), so what the student learns is what the engine runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from torch import Tensor

from glyph_engine.errors import GlyphEngineError
from glyph_engine.model import Glyffuser
from glyph_engine.pipeline import guided_timesteps
from glyph_engine.samplers import get_sampler
from glyph_engine.schedule import SamplerConfig

# What the student is trained for: DPM-Solver++ steps at order 1 (DDIM), the engine's default spacing.
STUDENT_SAMPLER = SamplerConfig(name="dpmpp-2m", order=1)
# The order it samples at by default, over those same timesteps: DPM-Solver++(2M). Measured on
# glyffuser-small's 8-step student (docs/distill-run2.md): at order 1 its densest glyphs came
# out a shade grey (1.4% broken against the teacher's 0.0%); the second-order update, which
# extrapolates from the last two x0 predictions, draws them clean (0.0%) with the same lifts.
STUDENT_SAMPLING_ORDER = 2


def guided_table(teacher: Glyffuser) -> Tensor:
    """(T,) bool: the training timesteps at which the engine guides the teacher by default.

    The engine's own rule (`pipeline.guided_timesteps`), applied to a run of every training
    timestep, so the student learns guidance exactly where the teacher gets it.
    """
    every = get_sampler(STUDENT_SAMPLER.name).coefficients(
        teacher.alphas_cumprod, len(teacher.alphas_cumprod), STUDENT_SAMPLER
    )
    table = torch.zeros(len(teacher.alphas_cumprod), dtype=torch.bool)
    table[list(guided_timesteps(every, teacher.guidance_interval))] = True
    return table


def run_unet(unet: UNet2DConditionModel, x: Tensor, t: Tensor, text: Tensor, mask: Tensor, **labels: Tensor) -> Tensor:
    return unet(x, t, encoder_hidden_states=text, encoder_attention_mask=mask, **labels).sample.float()


def teacher_guided_eps(
    unet: UNet2DConditionModel,
    x: Tensor,
    t: Tensor,
    text: Tensor,
    mask: Tensor,
    guidance: Tensor,
    guided: Tensor,
    uncond: tuple[Tensor, Tensor],
) -> Tensor:
    """The teacher's noise prediction as the engine's sampler uses it: eps_u + g (eps_c - eps_u)
    for rows whose timestep `guided` marks, the conditional prediction alone for the others.

    `guidance` (B,) is each row's scale; `uncond` the unconditional (1, L, D) text and (1, L)
    mask (`pipeline.unconditional_text`). One U-Net call, as the engine batches it.
    """
    rows = guided[t.cpu()].to(x.device)
    k = int(rows.sum())
    uncond_text, uncond_mask = uncond
    eps = run_unet(
        unet,
        torch.cat([x[rows], x]),
        torch.cat([t[rows], t]),
        torch.cat([uncond_text.expand(k, -1, -1), text]),
        torch.cat([uncond_mask.expand(k, -1), mask]),
    )
    eps_uncond, eps_cond = eps[:k], eps[k:]
    g = guidance[rows].view(-1, *([1] * (x.dim() - 1)))
    return eps_cond.index_put((rows,), eps_uncond + g * (eps_cond[rows] - eps_uncond))


@dataclass(frozen=True)
class StepTable:
    """The engine's order-1 step scalars of an N-step run, as tensors to take per row:
    ``x0 = x_scale x - eps_scale eps``, ``x_next = a x + b x0`` (`schedule.StepCoefficients`)."""

    timestep: Tensor  # (N,) long
    x_scale: Tensor  # (N,) float32; eps_scale is the step's sigma
    eps_scale: Tensor
    a: Tensor
    b: Tensor

    @classmethod
    def of(cls, alphas_cumprod: np.ndarray, steps: int) -> StepTable:
        coefs = get_sampler(STUDENT_SAMPLER.name).coefficients(alphas_cumprod, steps, STUDENT_SAMPLER)
        column = lambda name: torch.tensor([getattr(c, name) for c in coefs], dtype=torch.float32)  # noqa: E731
        timestep = torch.tensor([c.timestep for c in coefs], dtype=torch.long)
        return cls(timestep, column("x_scale"), column("eps_scale"), column("a"), column("b"))

    def rows(self, name: str, i: Tensor, like: Tensor) -> Tensor:
        """Field `name` at each row's step `i`, shaped to broadcast over `like` (B, C, H, W)."""
        return getattr(self, name).to(like.device)[i].view(-1, *([1] * (like.dim() - 1)))


def check_nested(student: StepTable, teacher: StepTable) -> None:
    """Two teacher steps per student step: the teacher's run passes through every timestep of the student's."""
    n = len(student.timestep)
    if len(teacher.timestep) != 2 * n or not torch.equal(teacher.timestep[::2], student.timestep):
        raise GlyphEngineError(
            f"the engine's {2 * n}-step timesteps do not contain its {n}-step ones, so a {n}-step student "
            f"cannot learn two {2 * n}-step teacher steps at a time; choose other --start-steps/--final-steps."
        )


def ddim_step(
    x: Tensor, eps: Tensor, table: StepTable, i: Tensor, clamp: tuple[float, float] | None
) -> tuple[Tensor, Tensor]:
    """The engine's order-1 step (`sampler.dpmpp_step`) with each row at its own step `i`;
    returns (x_next, x0)."""
    x0 = predicted_x0(x, eps, table, i, clamp)
    return table.rows("a", i, x) * x + table.rows("b", i, x) * x0, x0


def predicted_x0(x: Tensor, eps: Tensor, table: StepTable, i: Tensor, clamp: tuple[float, float] | None) -> Tensor:
    """x0 = x_scale x - eps_scale eps at each row's step `i`, clamped as the engine clamps it."""
    x0 = table.rows("x_scale", i, x) * x - table.rows("eps_scale", i, x) * eps
    return x0 if clamp is None else x0.clamp(*clamp)


@dataclass(frozen=True)
class MidpointTable:
    """Single-step DPM-Solver++(2S) over an N-step run, through the midpoints the 2N-step run
    puts between its timesteps: diffusers' DPMSolverSinglestepScheduler(solver_order=2) at 2N
    steps. Step k is a DDIM half step to the midpoint (the 2N-step run's step 2k), then a full
    step from the start, ``x_next = a x + b D`` with ``D = (1 - c) x0 + c x0_mid`` (the
    midpoint rule; its last step is two DDIM halves, as diffusers ends, so c = 1 there).

    Measured on the embedded model, guided (64 glyphs for each of `eval`'s 8 prompts;
    bench/midpoint_teacher.py, docs/distill-teacher-2s.md): 16 such steps (32 U-Net passes)
    draw as the engine's 20 DPM-Solver++(2M) steps do (0.0% broken, the same lifts and
    nearest-neighbour distance), 8 of them 0.4% broken, where 16 DDIM steps draw 1.6%."""

    steps: StepTable  # the N-step run: timesteps, x0 scalars and the full step's a, b
    halves: StepTable  # the 2N-step run: even rows the half step, odd rows the midpoints
    c: Tensor  # (N,) float32: the midpoint x0's weight in D

    @classmethod
    def of(cls, alphas_cumprod: np.ndarray, steps: int) -> MidpointTable:
        full, halves = StepTable.of(alphas_cumprod, steps), StepTable.of(alphas_cumprod, 2 * steps)
        check_nested(full, halves)
        log_sigma = lambda t: torch.log(t.double())  # noqa: E731  lambda = -log(sigma)
        start, mid = log_sigma(full.eps_scale), log_sigma(halves.eps_scale[1::2])
        end = torch.cat([start[1:], torch.tensor([-torch.inf], dtype=torch.float64)])  # the last step ends at sigma 0
        r = (start - mid) / (start - end)  # where the midpoint lies in lambda, 0..1
        c = (0.5 / r).float()
        c[-1] = 1.0
        return cls(full, halves, c)

    def step(
        self, eps: Callable[[Tensor, Tensor], Tensor], x: Tensor, k: Tensor, clamp: tuple[float, float] | None
    ) -> tuple[Tensor, Tensor]:
        """Step `k` (per row) of the teacher whose noise prediction is eps(x, timesteps); returns (x_next, D)."""
        full, halves = self.steps, self.halves
        x0 = predicted_x0(x, eps(x, full.timestep.to(x.device)[k]), full, k, clamp)
        x_mid = halves.rows("a", 2 * k, x) * x + halves.rows("b", 2 * k, x) * x0
        mid = 2 * k + 1
        x0_mid = predicted_x0(x_mid, eps(x_mid, halves.timestep.to(x.device)[mid]), halves, mid, clamp)
        c = self.c.to(x.device)[k].view(-1, *([1] * (x.dim() - 1)))
        d = (1 - c) * x0 + c * x0_mid
        return full.rows("a", k, x) * x + full.rows("b", k, x) * d, d


# One teacher step with each row at its own step k: (x, k) -> (x_next, D), x_next = a x + b D.
TeacherStep = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def clamped_error(x0: Tensor, target: Tensor, clamp: tuple[float, float] | None) -> Tensor:
    """x0 - target, with x0 clamped where the target lies on a bound of `clamp` (None: no
    clamp): the sampler clamps x0, so beyond such a bound x0 lands on the target exactly.
    Elsewhere x0 stays unclamped, so that an x0 past a bound the target is not on still
    has a gradient back."""
    if clamp is None:
        return x0 - target
    low, high = clamp
    slack = 1e-4 * (high - low)  # the target, summed from clamped x0s, meets a bound only up to rounding
    on_bound = (target >= high - slack) | (target <= low + slack)
    return torch.where(on_bound, x0.clamp(low, high), x0) - target


def progressive_target(
    teacher_step: TeacherStep,
    z: Tensor,
    i: Tensor,
    student: StepTable,
    teacher: StepTable,
    clamp: tuple[float, float] | None,
) -> Tensor:
    """The x0 whose one student step from z (at its step i) lands where two teacher steps do
    (Salimans & Ho, Algorithm 2, on the engine's coefficients).

    Both runs are DDIM-shaped, x_next = a x + b D, and the teacher's two steps nest in the
    student's (their a's multiply to the student's), so the target is the teacher's D's
    weighted as the two steps carry them, over the student's b: summed directly rather than
    solved from (x_next - a z) / b, which at the first step divides rounding by b = 0.005.
    With the clamp, the student's x0 is clamped when it samples, so the nearest it can land
    is the clamped target.
    """
    x, carried = z, torch.zeros_like(z)
    for k in (2 * i, 2 * i + 1):
        x, d = teacher_step(x, k)
        carried = teacher.rows("a", k, z) * carried + teacher.rows("b", k, z) * d
    target = carried / student.rows("b", i, z)
    return target if clamp is None else target.clamp(*clamp)
