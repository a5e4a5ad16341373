"""`glyph-engine distill`'s settings and the stages they make. Light on purpose (no torch),
so the CLI reads its defaults without slowing `--help`."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from glyph_engine.errors import GlyphEngineError
from glyph_engine.settings import check_guidance


@dataclass(frozen=True)
class DistillConfig:
    """How the student is trained; a workdir keeps one (resuming with other values is refused)."""

    batch_size: int = 64  # as `train`: the tens of images/s a 2-core CPU trains at
    learning_rate: float = 1e-4  # fine-tuning a trained model: a sixth of `train`'s rate
    warmup_steps: int = 100  # per stage: each stage starts with a fresh optimizer
    # Optimizer steps of the guidance stage. The student starts as the teacher's conditional
    # prediction and only learns the guidance input's effect (Meng et al.'s first stage).
    guidance_steps: int = 1000
    # Guidance scales the student learns, one drawn uniformly per image in every stage, so
    # --guidance still means something for the student (Meng et al. train on a range).
    # None: [1, 2 x the teacher's default].
    guidance_range: tuple[float, float] | None = None
    # Progressive distillation starts from the guidance stage's student sampled with this many
    # DDIM steps and halves them each stage, down to final_steps (start = final x 2^k, k >= 1).
    # Each stage's student is at best its teacher: a larger start is closer to the guided
    # teacher at 20 DPM-Solver++ steps, and costs one more stage per doubling. Measured on the
    # embedded model (`eval`, 512 glyphs): the guided teacher with DDIM at 16 steps draws 1.8%
    # broken glyphs, at 32 steps 0.2%, at its own 20 DPM-Solver++ steps 0.0%; the gate allows 1
    # point more, so the halvings start from 32.
    start_steps: int = 32
    final_steps: int = 4
    stage_steps: int = 800  # optimizer steps of each halving
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
        if values.get("guidance_range") is not None:
            values["guidance_range"] = tuple(values["guidance_range"])
        return cls(**values)

    def validate(self) -> None:
        """Refuses settings that cannot train, before the teacher is loaded."""
        for name in ("batch_size", "guidance_steps", "final_steps", "stage_steps", "warmup_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise GlyphEngineError(f"{option_name(name)} must be a whole number of at least 1 (got {value}).")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise GlyphEngineError(f"the learning rate must be positive (got {self.learning_rate}).")
        ratio = self.start_steps / self.final_steps
        if not (self.start_steps > self.final_steps and ratio.is_integer() and int(ratio) & (int(ratio) - 1) == 0):
            raise GlyphEngineError(
                f"--start-steps must be --final-steps times a power of two, at least 2 (got {self.start_steps} "
                f"and {self.final_steps}): each stage halves the steps."
            )
        if self.guidance_range is not None:
            low, high = self.guidance_range
            check_guidance(low, "the lower guidance of the range")
            check_guidance(high, "the upper guidance of the range")
            if low > high:
                raise GlyphEngineError(f"the guidance range must be low <= high (got {low} {high}).")

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
    """Guidance distillation, then one stage per halving down to the final step count."""
    plan = [Stage("guidance", config.guidance_steps, None)]
    n = config.start_steps // 2
    while n >= config.final_steps:
        plan.append(Stage(f"{n} steps", config.stage_steps, n))
        n //= 2
    return plan
