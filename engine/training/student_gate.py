"""The quality gate a distilled student passes before it may replace its teacher.

Both are evaluated as `glyph-engine eval` runs them (the radical prompts, same seeds, each at
its own defaults unless told otherwise) and compared on four counts:
- every prompt's lift at least `LIFT_SHARE` of the teacher's (or higher);
- at least as many prompts at `STRONG_LIFT` or more;
- broken share at most `BROKEN_MARGIN` above the teacher's;
- mean nearest-neighbour distance not lower: a student that copies training glyphs draws
  closer to them. Two runs of one model on other seeds differ by their standard errors, so
  "lower" means lower by more than `NN_STANDARD_ERRORS` standard errors of the difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from glyph_engine.training.evaluate import RadicalResult

LIFT_SHARE = 0.8
STRONG_LIFT = 5.0
BROKEN_MARGIN = 0.01
NN_STANDARD_ERRORS = 2.0


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class GateResult:
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def __str__(self) -> str:
        lines = [f"- {'pass' if c.passed else 'FAIL'}: {c.name}: {c.detail}" for c in self.checks]
        verdict = "the student passes the gate" if self.passed else "the student fails the gate"
        return "\n".join([f"Gate, student against teacher: {verdict}.", *lines])


def mean_broken(results: Sequence[RadicalResult]) -> float:
    return sum(r.broken_share for r in results) / len(results)


def mean_nn(results: Sequence[RadicalResult]) -> tuple[float, float]:
    """The mean nearest-neighbour distance over all prompts and its standard error."""
    mean = sum(r.mean_nn_distance for r in results) / len(results)
    return mean, math.sqrt(sum(r.nn_distance_se**2 for r in results)) / len(results)


def gate(teacher: Sequence[RadicalResult], student: Sequence[RadicalResult]) -> GateResult:
    """Student against teacher, prompt by prompt (both evaluated on the same prompts)."""
    if [r.prompt for r in teacher] != [r.prompt for r in student] or not teacher:
        raise ValueError("the teacher and the student must be evaluated on the same prompts")
    weak = [
        f"{s.prompt} {s.lift:.1f}x < {LIFT_SHARE:.0%} of {t.lift:.1f}x"
        for t, s in zip(teacher, student, strict=True)
        if s.lift < LIFT_SHARE * t.lift
    ]
    strong_t = sum(r.lift >= STRONG_LIFT for r in teacher)
    strong_s = sum(r.lift >= STRONG_LIFT for r in student)
    broken_t, broken_s = mean_broken(teacher), mean_broken(student)
    (nn_t, se_t), (nn_s, se_s) = mean_nn(teacher), mean_nn(student)
    allowance = NN_STANDARD_ERRORS * math.hypot(se_t, se_s)
    return GateResult(
        (
            Check(
                f"every lift within {1 - LIFT_SHARE:.0%} of the teacher's",
                not weak,
                "; ".join(weak) if weak else f"all {len(student)} prompts",
            ),
            Check(
                f"prompts at {STRONG_LIFT:g}x or more",
                strong_s >= strong_t,
                f"student {strong_s}, teacher {strong_t}",
            ),
            Check(
                f"broken share at most {BROKEN_MARGIN:.0%} point above the teacher's",
                broken_s <= broken_t + BROKEN_MARGIN + 1e-12,
                f"student {broken_s:.1%}, teacher {broken_t:.1%}",
            ),
            Check(
                "mean nearest-neighbour distance not lower (no copied training glyphs)",
                nn_s >= nn_t - allowance,
                f"student {nn_s:.4f}, teacher {nn_t:.4f} (lower counts beyond {allowance:.4f}, "
                f"{NN_STANDARD_ERRORS:g} standard errors)",
            ),
        )
    )
