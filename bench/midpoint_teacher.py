"""The guided teacher sampled as `distill`'s first halving learns it: single-step
DPM-Solver++(2S) steps (`distill_targets.MidpointTable`, two U-Net passes each) with the
teacher's guidance combined as the engine combines it (`teacher_guided_eps`), beside DDIM at
the same passes. Each row is `eval`'s radical evaluation (its prompts, 64 glyphs each, its
seeds and centred noise) gated against the teacher at its reference steps, as
`student_quality.py` gates a student: a student is at best the teacher it learns from.

    python bench/midpoint_teacher.py --data glyphs.npz --midpoint-steps 8,16 --ddim-steps 16 \
        [--out docs/distill-teacher-2s]

Torch, U-Net passes in bf16 where the CPU has BF16 units (as distill runs its teacher), else fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glyph_engine.cpu import cpu_info
from glyph_engine.model import TEACHER_MODEL, Glyffuser
from glyph_engine.pipeline import encode_prompts, image_seeds, unconditional_text
from glyph_engine.sampler import centred, initial_noise
from glyph_engine.session import ModelSource, Session
from glyph_engine.settings import GenerationSettings, reference_steps
from glyph_engine.training.dataset import GlyphSet, load_glyph_set
from glyph_engine.training.distill_targets import MidpointTable, StepTable, ddim_step, guided_table, teacher_guided_eps
from glyph_engine.training.evaluate import RADICAL_PROMPTS, RadicalResult, radical_hit_rates, radical_result
from glyph_engine.training.student_gate import gate, mean_broken, mean_nn


@dataclass(frozen=True)
class GuidedPrompt:
    """n rows of one prompt as the guided teacher samples them: `eval`'s seeds and noise, the
    guidance combined as the engine combines it, U-Net passes in bf16 where the CPU has BF16 units."""

    model: Glyffuser
    text: torch.Tensor
    mask: torch.Tensor
    uncond: tuple[torch.Tensor, torch.Tensor]
    guidance: torch.Tensor
    bf16: bool

    @classmethod
    def of(cls, session: Session, prompt: str, n: int) -> GuidedPrompt:
        model, backend = session.model, session.backend
        text, mask = encode_prompts(model, backend, [prompt])
        text, mask = text.expand(n, -1, -1).clone(), mask.expand(n, -1).clone()
        uncond = tuple(u.clone() for u in unconditional_text(model, backend, text[:1]))
        return cls(model, text, mask, uncond, torch.full((n,), model.default_guidance), cpu_info().has_bf16)

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return teacher_guided_eps(
                self.model.unet, x, t, self.text, self.mask, self.guidance, guided_table(self.model), self.uncond
            )

    def start(self) -> torch.Tensor:
        x = initial_noise(image_seeds(0, len(self.guidance)), self.model.image_shape)
        return centred(x) if self.model.center_noise else x

    @property
    def clamp(self) -> tuple[float, float] | None:
        return self.model.pixel_range if self.model.clamp_x0 else None

    def pixels(self, x: torch.Tensor) -> np.ndarray:
        """x in [0, 1] (white 1), as `eval` scores it."""
        low, high = self.model.pixel_range
        return ((x[:, 0] - low) / (high - low)).clamp(0, 1).numpy()


def sample(session: Session, prompt: str, n: int, solver: str, steps: int) -> np.ndarray:
    """n glyphs of `prompt` in [0, 1], from `eval`'s seeds and noise."""
    rows = GuidedPrompt.of(session, prompt, n)
    x, abar = rows.start(), session.model.alphas_cumprod
    with torch.no_grad():
        if solver == "2s":
            table = MidpointTable.of(abar, steps)
            for k in range(steps):
                x, _ = table.step(rows.eps, x, torch.full((n,), k), rows.clamp)
        else:
            ddim = StepTable.of(abar, steps)
            for k in range(steps):
                i = torch.full((n,), k)
                x, _ = ddim_step(x, rows.eps(x, ddim.timestep[i]), ddim, i, rows.clamp)
    return rows.pixels(x)


def results(session: Session, glyphs: GlyphSet, n: int, solver: str, steps: int) -> list[RadicalResult]:
    return [
        radical_result(prompt, radical, sample(session, prompt, n, solver, steps), glyphs)
        for prompt, radical in RADICAL_PROMPTS.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("glyphs.npz"))
    parser.add_argument("--teacher", type=Path, default=Path(TEACHER_MODEL), help="a teacher, not a student")
    steps = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--midpoint-steps", type=steps, default=[8, 16])
    parser.add_argument("--ddim-steps", type=steps, default=[16])
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("distill-teacher-2s"))
    args = parser.parse_args()

    glyphs = load_glyph_set(args.data)
    session = Session.load(ModelSource(ckpt=args.teacher, backend="torch", precision="fp32"))
    reference = reference_steps(session.model)
    started = time.perf_counter()
    teacher = radical_hit_rates(
        session.model, session.backend, glyphs, args.n, GenerationSettings(steps=reference).resolve(session.model)
    )
    rows = [("dpmpp-2m (the engine's sampler, fp32)", reference, reference, teacher, "reference")]
    for solver, counts in (("2s", args.midpoint_steps), ("ddim", args.ddim_steps)):
        for s in counts:
            measured = results(session, glyphs, args.n, solver, s)
            verdict = gate(teacher, measured)
            title = "DPM-Solver++(2S), the first halving's teacher" if solver == "2s" else "DDIM"
            failed = "; ".join(c.detail for c in verdict.checks if not c.passed)
            rows.append((title, s, 2 * s if solver == "2s" else s, measured, f"fail: {failed}" if failed else "pass"))
            print(f"{title} at {s} steps: {mean_broken(measured):.1%} broken", file=sys.stderr)

    prompts = list(RADICAL_PROMPTS)
    lines = [
        f"Guided teacher ({session.model.source}), {args.n} glyphs per prompt, torch on {cpu_info().model}; "
        "guidance as the engine applies it (default scale, guidance interval). U-Net evaluations per glyph: "
        "a guided one runs the unconditional half in the same call. The 2S and DDIM rows run their U-Net passes "
        "in bf16 where the CPU has BF16 units, as distill runs its teacher.",
        "",
        f"| sampler | steps | U-Net evaluations | {' | '.join(prompts)} | broken | NN distance | gate |",
        "| --- | ---: | ---: |" + " ---: |" * len(prompts) + " ---: | ---: | --- |",
    ]
    for title, s, passes, measured, verdict in rows:
        lifts = " | ".join(f"{r.lift:.1f}x" for r in measured)
        quality = f"{mean_broken(measured):.1%} | {mean_nn(measured)[0]:.3f}"
        lines.append(f"| {title} | {s} | {passes} | {lifts} | {quality} | {verdict} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    record = {
        "cpu": cpu_info().model,
        "seconds": round(time.perf_counter() - started),
        "rows": [
            {"sampler": t, "steps": s, "evaluations": p, "results": [r.__dict__ for r in m], "gate": v}
            for t, s, p, m, v in rows
        ],
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
