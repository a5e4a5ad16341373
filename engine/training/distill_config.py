"""`glyph-engine distill`'s settings and the stages they make. Light on purpose (no torch),
so the CLI reads its defaults without slowing `--help`."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from glyph_engine.errors import GlyphEngineError
from glyph_engine.settings import check_guidance
from glyph_engine.training.rates import warmed_up

STEP_WEIGHTINGS = ("balanced", "snr")
X0_LOSSES = ("clamped", "mse")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class DistillConfig:
    """How the student is trained; a workdir keeps one (resuming with other values is refused)."""

    batch_size: int = 64  # as `train`: the tens of images/s a 2-core CPU trains at
    learning_rate: float = 1e-4  # fine-tuning a trained model: a sixth of `train`'s rate
    warmup_steps: int = 100  # per stage: each stage starts with a fresh optimizer
    # The learning rate after each stage's warm-up: "constant", or "cosine", falling along half a
    # cosine to 0 at the stage's last step (the gradient noise that a constant rate leaves in
    # the weights shrinks with the step size; the weight average alone smooths it over its
    # ~1,000-step span). Measured (docs/distill-run2.md, run 4's last 1,100 halving steps): the
    # broken share moved within 1.6-2.3% at either rate and the finished student drew 1.4%; not
    # a measured gain, so constant by default.
    lr_schedule: str = "constant"
    # Optimizer steps of a first stage of guidance distillation alone (0: none): the student,
    # started as the teacher's conditional prediction, learns in one pass the teacher's guided
    # eps (Meng et al.'s first stage). The halvings learn from the guided teacher itself, so
    # this stage is where the guidance input starts, not a teacher: without it, an 8-step
    # student learnt the guidance too slowly from the x0 targets alone (embedded model, 500
    # steps: fire, heart and speech at 3.8x, 2.3x and 1.8x against the teacher's 10.4x, 3.9x
    # and 6.0x, no better than at 200 steps), where this stage alone had lifted every prompt to
    # the teacher's or higher in 1,000 steps (docs/distill-quality.md).
    guidance_steps: int = 1000
    # Guidance scales the student learns, one drawn uniformly per image in every stage, so
    # --guidance still means something for the student (Meng et al. train on a range).
    # None: [1, 2 x the teacher's default].
    guidance_range: tuple[float, float] | None = None
    # The first halving's teacher is the guided teacher taking start_steps single-step
    # DPM-Solver++(2S) steps (`distill_targets.MidpointTable`: 2 U-Net passes each); each
    # stage halves the steps, down to final_steps (start = final x 2^k, k >= 1); later stages
    # learn two DDIM steps of the stage before. Each stage's student is at best its teacher.
    # Measured on the embedded model (`eval`'s 8 prompts, 64 glyphs each, guided;
    # docs/distill-teacher-2s.md): 16 such steps draw as the engine's 20 DPM-Solver++(2M)
    # steps (0.0% broken, same lifts; the gate allows 1 point more), where 16 DDIM steps, the
    # first design's start, draw 1.6%; so an 8-step student learns the teacher's own quality
    # in one stage, with no chain of halvings to compound its errors.
    start_steps: int = 16
    final_steps: int = 8
    stage_steps: int = 3000  # optimizer steps of each halving
    # How the steps of a halving weigh in its loss. "snr": each sample's x0 MSE times max(SNR, 1)
    # (Salimans & Ho's truncated SNR weighting). "balanced": each sample's x0 MSE divided by a
    # running mean of its own step's (`state.step_scale`), so that every step's relative
    # improvement counts alike. Measured on the embedded model (8-step student, 16 2S teacher
    # steps; docs/distill-run2.md): under "snr" the first step's MSE (1.5) outweighed the last's
    # (0.0016) about a thousandfold, and after 1,000 steps the last two steps' losses had not
    # fallen (the last had risen from 0.0013): those steps clean the page, and the student's
    # glyphs came out speckled (9.4% broken, the teacher 0.0%).
    step_weighting: str = "balanced"
    # What a halving's loss compares, where the teacher clamps its x0 to the pixel range. "mse":
    # the student's x0 against the target. "clamped": the student's x0 as the sampler uses it,
    # clamped where the target lies on a bound of the range (the teacher's white page, its
    # darkest ink), so that an x0 beyond the bound costs nothing there. With "mse" the student
    # regresses to the bound from both sides, and the half of its page that falls short of
    # white stays light grey after the clamp: at 500 halving steps, 36% of its pixels were white
    # (at least 0.97) against the teacher's 48% on "fire", 26% against 15% light grey (0.85 to
    # 0.97), and its dense glyphs crossed `is_broken`'s speckle line (docs/distill-run2.md).
    x0_loss: str = "clamped"
    # The share of each halving batch whose noisy input is where the student's own steps stand,
    # not the dataset image noised: those rows start from generation's noise and take the
    # student's DDIM steps up to their step (no gradient), and the teacher's target is taken
    # from there (the student-induced distribution of DDIL, Garrepalli et al. 2024). Trained on
    # noised data alone, the student meets its own slightly-off inputs only when it samples,
    # and its errors compound: at 800 halving steps its last four steps broke 2.6% of glyphs
    # after the teacher's first four, 7.3% after its own (docs/distill-handover-run4.md).
    # Measured (docs/distill-run2.md, run 5): half rollouts from 1,000 to 1,300 halving steps
    # drew 1.8% broken against 2.0% without, one glyph of 512, for 40-50% more time per step;
    # no measured gain, so none by default.
    rollout_share: float = 0.0
    clause_sampling: float = 0.5  # as `train`: prompts are a word or two, captions several clauses
    # The weights each stage ends with, and so the next stage's teacher and the student
    # written out: the raw weights jitter from step to step.
    ema_decay: float = 0.999
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DistillConfig:
        values = json.loads(text)
        if not isinstance(values, dict):
            raise TypeError("the settings are not an object")
        # A state from before a setting trained as the setting's old behaviour.
        values.setdefault("step_weighting", "snr")
        values.setdefault("x0_loss", "mse")
        values.setdefault("rollout_share", 0.0)
        values.setdefault("lr_schedule", "constant")
        if values.get("guidance_range") is not None:
            values["guidance_range"] = tuple(values["guidance_range"])
        return cls(**values)

    def validate(self) -> None:
        """Refuses settings that cannot train, before the teacher is loaded."""
        for name in ("batch_size", "final_steps", "stage_steps", "warmup_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise GlyphEngineError(f"{option_name(name)} must be a whole number of at least 1 (got {value}).")
        if not (isinstance(self.guidance_steps, int) and self.guidance_steps >= 0):
            raise GlyphEngineError(f"--guidance-steps must be a whole number, 0 or more (got {self.guidance_steps}).")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise GlyphEngineError(f"the learning rate must be positive (got {self.learning_rate}).")
        ratio = self.start_steps / self.final_steps
        if not (self.start_steps > self.final_steps and ratio.is_integer() and int(ratio) & (int(ratio) - 1) == 0):
            raise GlyphEngineError(
                f"--start-steps must be --final-steps times a power of two, at least 2 (got {self.start_steps} "
                f"and {self.final_steps}): each stage halves the steps."
            )
        if self.step_weighting not in STEP_WEIGHTINGS:
            raise GlyphEngineError(
                f"--step-weighting must be one of {', '.join(STEP_WEIGHTINGS)} (got {self.step_weighting})."
            )
        if not (isinstance(self.rollout_share, int | float) and 0 <= self.rollout_share <= 1):
            raise GlyphEngineError(f"--rollout-share must be between 0 and 1 (got {self.rollout_share}).")
        if self.lr_schedule not in LR_SCHEDULES:
            raise GlyphEngineError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)} (got {self.lr_schedule}).")
        if self.x0_loss not in X0_LOSSES:
            raise GlyphEngineError(f"--x0-loss must be one of {', '.join(X0_LOSSES)} (got {self.x0_loss}).")
        if self.guidance_range is not None:
            low, high = self.guidance_range
            check_guidance(low, "the lower guidance of the range")
            check_guidance(high, "the upper guidance of the range")
            if low > high:
                raise GlyphEngineError(f"the guidance range must be low <= high (got {low} {high}).")

    def learning_rate_at(self, step: int, stage_steps: int) -> float:
        """The rate of a stage's optimizer step `step` (0-based) of `stage_steps`."""
        rate = warmed_up(self.learning_rate, step, self.warmup_steps)
        if self.lr_schedule == "cosine" and step >= self.warmup_steps:
            done = (step - self.warmup_steps) / max(1, stage_steps - self.warmup_steps)
            rate *= 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return rate

    def guidance_bounds(self, teacher_default: float) -> tuple[float, float]:
        return self.guidance_range or (1.0, max(1.0, 2.0 * teacher_default))


def option_name(name: str) -> str:
    """The CLI option that sets config field `name`."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Stage:
    name: str  # "guidance", "8 steps"
    steps: int  # optimizer steps
    student_steps: int | None  # the DDIM steps the student learns to take; None: the guidance stage


def stages(config: DistillConfig) -> list[Stage]:
    """Guidance distillation where asked, then one stage per halving down to the final step count."""
    plan = [Stage("guidance", config.guidance_steps, None)] if config.guidance_steps else []
    n = config.start_steps // 2
    while n >= config.final_steps:
        plan.append(Stage(f"{n} steps", config.stage_steps, n))
        n //= 2
    return plan
