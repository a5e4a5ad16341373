"""The samplers `--sampler` chooses from: name -> schedule coefficients, order, fused or not.

Every sampler here is a linear multistep solver in data (x0) prediction: its steps are host
scalars (`schedule.StepCoefficients`) and one elementwise update (`sampler.dpmpp_step`), so
the pipeline, the PNG metadata and the benchmarks only ever see a `Sampler`. A new one is an
entry in SAMPLERS and, where its coefficients are new, a function that computes them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from glyph_engine.errors import GlyphEngineError
from glyph_engine.schedule import SamplerConfig, StepCoefficients, dpmpp_coefficients


@dataclass(frozen=True)
class Sampler:
    name: str  # as --sampler takes it
    title: str  # as diffusers' users know it
    order: int  # its highest order; --order may lower it
    fused: bool  # whether the fused op (one previous x0 at most) runs every step of it
    diffusers: str  # the diffusers scheduler it is checked against (tests/test_sampler.py)
    _coefficients: Callable[[np.ndarray, int, SamplerConfig], list[StepCoefficients]]

    def coefficients(self, alphas_cumprod: np.ndarray, steps: int, config: SamplerConfig) -> list[StepCoefficients]:
        """The per-step scalars of `steps` steps; `config.order` None means this sampler's own."""
        return self._coefficients(alphas_cumprod, steps, replace(config, order=config.order or self.order))

    def describe(self, config: SamplerConfig) -> str:
        """How a PNG records it, e.g. "dpmpp-2m order 2, linspace, karras"."""
        order = config.order or self.order
        return f"{self.name} order {order}, {config.spacing.value}" + (", karras" if config.karras_sigmas else "")


SAMPLERS = {
    s.name: s
    for s in (
        Sampler(
            "dpmpp-2m",
            "DPM-Solver++(2M)",
            2,
            True,
            "DPMSolverMultistepScheduler(solver_order=2)",
            dpmpp_coefficients,
        ),
        Sampler(
            "dpmpp-3m",
            "DPM-Solver++(3M)",
            3,
            False,
            "DPMSolverMultistepScheduler(solver_order=3)",
            dpmpp_coefficients,
        ),
    )
}
DEFAULT_SAMPLER = SamplerConfig().name  # the glyffuser's own, DPM-Solver++(2M)

# `--sampler`'s choices, from the registry.
SamplerName = enum.Enum("SamplerName", {name: name for name in SAMPLERS}, type=str)


def get_sampler(name: str) -> Sampler:
    """The registered sampler `name`, or a line saying which exist."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise GlyphEngineError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.") from None
