"""The learning-rate warm-up `train` and `distill` share. Light (no torch): the distill
config, which the CLI reads for `--help`, uses it."""

from __future__ import annotations


def warmed_up(rate: float, step: int, warmup_steps: int) -> float:
    """`rate` at optimizer step `step` (0-based): ramped linearly over the first `warmup_steps`
    steps, so that a fresh optimizer's first updates stay small."""
    return rate * min(1.0, (step + 1) / warmup_steps)
