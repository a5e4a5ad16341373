"""The options of a generation, defined once: the library, the CLI and its choice lists all
use these types. Light on purpose (no torch), so `glyph-engine --help` starts fast."""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from glyph_engine.errors import GlyphEngineError
from glyph_engine.samplers import Sampler, get_sampler
from glyph_engine.schedule import SamplerConfig

if TYPE_CHECKING:
    from glyph_engine.model import Glyffuser

logger = logging.getLogger(__name__)


class BackendName(str, enum.Enum):
    """`--backend`: "auto" picks the fastest one available here."""

    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"
    openvino = "openvino"
    inductor = "inductor"
    tensorrt = "tensorrt"


class Precision(str, enum.Enum):
    """`--precision` of the U-Net. Each backend runs the precisions it accepts as asked and
    refuses the others. "auto" on a CPU: int8 where an int8 build of this model passed the
    quality gate here, else bf16 where the CPU has BF16 units (AVX-512 BF16 or AMX), else
    fp32; on a GPU: fp16."""

    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"


class StepImpl(str, enum.Enum):
    """`--step-impl`: "fused" needs the op built for the device; "auto" uses it where it is."""

    auto = "auto"
    fused = "fused"
    torch = "torch"


@dataclass(frozen=True)
class GenerationSettings:
    """How to sample: the one definition of `generate`'s sampling options and their defaults."""

    steps: int | None = None  # None: the checkpoint's (a student's few, a teacher's gated), else DEFAULT_STEPS
    guidance: float | None = None  # None: the checkpoint's default; 1.0 skips the unconditional pass
    seed: int = 0
    batch_size: int | None = None  # images per U-Net call (x2 with guidance); None: all at once
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    clamp_x0: bool | None = None  # clamp each step's x0 to the pixel range; None: the checkpoint's default
    # Guidance only at steps whose noise level sigma lies in (low, high] (Kynkaanniemi et al.
    # 2024, arXiv 2404.07724); the other steps run the conditional half of the batch alone.
    # None: the checkpoint's default; (0, inf) guides every step.
    guidance_interval: tuple[float, float] | None = None
    # Remove each image's mean from its initial noise; None: the checkpoint's default. Small
    # models may fail to correct the noise's mean, drawing grey backgrounds for seeds whose
    # noise is darker than average (docs/broken-samples.md).
    center_noise: bool | None = None
    step_impl: StepImpl = StepImpl.auto  # "fused" C++/CUDA op, "torch" eager reference; auto: fused where built

    def validate(self) -> None:
        """Refuses settings that cannot give a picture, before any model is loaded."""
        if self.steps is not None and self.steps < 1:
            raise GlyphEngineError(f"--steps must be at least 1 (got {self.steps}).")
        if self.guidance is not None:
            check_guidance(self.guidance, "--guidance")
        if self.seed < 0:
            raise GlyphEngineError(f"--seed must be 0 or more (got {self.seed}).")
        if self.batch_size is not None and self.batch_size < 1:
            raise GlyphEngineError(f"--batch-size must be at least 1 (got {self.batch_size}).")
        if self.guidance_interval is not None and not valid_interval(self.guidance_interval):
            low, high = self.guidance_interval
            raise GlyphEngineError(
                f"--guidance-interval must be two noise levels LOW HIGH with 0 <= LOW < HIGH "
                f"(got {low:g} {high:g}); HIGH may be inf, and 0 inf guides every step."
            )
        sampler = get_sampler(self.sampler.name)
        if self.sampler.order is not None and not 1 <= self.sampler.order <= sampler.order:
            raise GlyphEngineError(
                f"--order must be from 1 to {sampler.order} for --sampler {sampler.name} (got {self.sampler.order})."
            )

    def resolve(self, model: Glyffuser) -> ResolvedSettings:
        """These settings checked against `model`, with its defaults filled in: what one
        generation runs with and records. Call once per run; everything downstream reads it."""
        self.validate()
        steps = self.steps or model.default_steps or DEFAULT_STEPS
        max_steps = len(model.alphas_cumprod)
        if steps > max_steps:
            raise GlyphEngineError(f"--steps must be at most {max_steps}, the model's training timesteps.")
        sampler = get_sampler(self.sampler.name)
        # A student's own order (the one its gate measured; its steps were trained at order 1)
        # applies to the sampler it was trained for.
        own_order = model.default_order if model.default_sampler in (None, sampler.name) else None
        # Only a student records an order; a teacher's recorded steps are a gated default
        # (fewer steps that draw as well), not a condition of its training.
        if model.default_order is not None and _off_its_training(self, model, own_order):
            logger.warning(
                "this student was distilled for %d %s steps with linspace spacing and is meant to sample them at "
                "order %s; other sampling settings run outside what it learnt",
                model.default_steps,
                model.default_sampler or sampler.name,
                model.default_order,
            )
        guidance = model.default_guidance if self.guidance is None else self.guidance
        interval = model.guidance_interval if self.guidance_interval is None else self.guidance_interval
        return ResolvedSettings(
            steps=steps,
            guidance=guidance,
            guidance_interval=interval if guidance != GUIDANCE_OFF else None,
            seed=self.seed,
            batch_size=self.batch_size,
            sampler=sampler,
            # "leading" spacing is offset as the model's own training scheduler says.
            schedule=replace(
                self.sampler,
                order=self.sampler.order or own_order or sampler.order,
                steps_offset=int(model.scheduler_config.get("steps_offset", 0)),
            ),
            clamp_x0=model.clamp_x0 if self.clamp_x0 is None else self.clamp_x0,
            center_noise=model.center_noise if self.center_noise is None else self.center_noise,
            step_impl=self.step_impl,
        )


def _off_its_training(settings: GenerationSettings, model: Glyffuser, own_order: int | None) -> bool:
    """Whether `settings` sample a distilled student otherwise than it was trained to."""
    sampler = settings.sampler
    return (
        settings.steps not in (None, model.default_steps)
        or own_order is None
        or sampler.order not in (None, own_order)
        or sampler.spacing != "linspace"
        or sampler.karras_sigmas
    )


def resolved(settings: GenerationSettings | ResolvedSettings, model: Glyffuser) -> ResolvedSettings:
    """`settings` resolved against `model`; resolved ones pass as they are, so a run that
    resolved its settings up front (generate, bulk, serve) is not checked again."""
    return settings if isinstance(settings, ResolvedSettings) else settings.resolve(model)


DEFAULT_STEPS = 20  # the glyffuser author's choice; 10 is usable, 50 barely better


def reference_steps(model: Glyffuser) -> int:
    """The steps a model runs at as a quality gate's reference (`eval --against`): a student's
    own, what it was trained for; a teacher's DEFAULT_STEPS even where it records fewer, since
    those fewer were gated against DEFAULT_STEPS: the bar does not move with each reduction."""
    if model.default_order is not None:
        return model.default_steps or DEFAULT_STEPS
    return DEFAULT_STEPS


GUIDANCE_OFF = 1.0  # the guided prediction equals the conditional one: the unconditional pass is skipped


@dataclass(frozen=True)
class ResolvedSettings:
    """`GenerationSettings` resolved against one model (`GenerationSettings.resolve`): no
    default left open, every value checked. Sampling, the PNG metadata, serve, bulk, eval and
    bench all read this one object."""

    steps: int
    guidance: float
    guidance_interval: tuple[float, float] | None  # the noise levels guided; None: every step (or none: unguided)
    seed: int
    batch_size: int | None
    sampler: Sampler
    schedule: SamplerConfig  # its order and the model's step offset filled in
    clamp_x0: bool
    center_noise: bool
    step_impl: StepImpl  # as asked; the one that ran is in the Generation

    @property
    def guided(self) -> bool:
        return self.guidance != GUIDANCE_OFF


# CFG-trained models want 5-15 (the glyffuser's author); far beyond, the guided prediction
# overflows (1e308 gives infinities), so the bound is a typo's, not a model's.
MAX_GUIDANCE = 100.0


def check_guidance(value: float, what: str) -> None:
    """The one rule for a guidance scale, wherever it comes from (an option, a checkpoint, a
    request): a finite number from 0 to MAX_GUIDANCE; `what` names it in the message."""
    if not (math.isfinite(value) and 0 <= value <= MAX_GUIDANCE):
        raise GlyphEngineError(
            f"{what} must be a finite number from 0 to {MAX_GUIDANCE:g} (got {value}); 1 turns guidance off."
        )


def valid_interval(interval: tuple[float, float]) -> bool:
    """A guidance interval (low, high] of noise levels: 0 <= low < high, high may be inf."""
    low, high = interval
    return math.isfinite(low) and low >= 0 and low < high
