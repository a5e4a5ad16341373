"""Which of a few-step student's steps leave its glyphs broken: the student and the guided
teacher it learnt from (`distill`'s first-halving teacher: DPM-Solver++(2S), two teacher steps
per student step, `MidpointTable`) hand the same trajectories over to each other at a chosen
step; the broken share (`evaluate.is_broken`) of each mix tells where the damage is done.

    python bench/student_handover.py --student W/snapshot.pt [--prompts fire,heart,wood] \
        [--switch 4,6,7] [-n 64] [--out docs/distill-handover]

Rows: the teacher alone, the student alone, and for each switch step s the student's first s
steps then the teacher's, and the teacher's first s steps then the student's. `eval`'s seeds
and centred noise; torch, U-Net passes in bf16 where the CPU has BF16 units (as distill runs
its teacher), else fp32. The student's steps are the DDIM steps it samples with.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from midpoint_teacher import GuidedPrompt

from glyph_engine import GlyphEngineError
from glyph_engine.checkpoint import load_model
from glyph_engine.cpu import cpu_info
from glyph_engine.model import TEACHER_MODEL, Glyffuser, guidance_labels
from glyph_engine.session import ModelSource, Session
from glyph_engine.training.distill_targets import (
    MidpointTable,
    StepTable,
    ddim_step,
    run_unet,
)
from glyph_engine.training.evaluate import is_broken


def mixes(steps: int, switches: list[int]) -> dict[str, Callable[[int], bool]]:
    """Row title -> whether the student takes step k."""
    rows: dict[str, Callable[[int], bool]] = {"teacher alone": lambda k: False, "student alone": lambda k: True}
    for s in switches:
        rows[f"student's first {s}, then the teacher"] = lambda k, s=s: k < s
        rows[f"teacher's first {s}, then the student"] = lambda k, s=s: k >= s
    return rows


def broken_share(student: Glyffuser, session: Session, prompt: str, n: int, student_at: Callable[[int], bool]) -> float:
    """The share of n glyphs of `prompt` broken when the student takes the steps k where student_at(k)."""
    steps, rows = student.default_steps, GuidedPrompt.of(session, prompt, n)
    labels = {"class_labels": guidance_labels(rows.guidance, n, "cpu")}
    abar = session.model.alphas_cumprod
    mine, midpoints = StepTable.of(abar, steps), MidpointTable.of(abar, 2 * steps)
    x = rows.start()
    with torch.no_grad():
        for k in range(steps):
            if student_at(k):
                i = torch.full((n,), k)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=rows.bf16):
                    eps = run_unet(student.unet, x, mine.timestep[i], rows.text, rows.mask, **labels)
                x, _ = ddim_step(x, eps, mine, i, rows.clamp)
            else:
                for j in (2 * k, 2 * k + 1):
                    x, _ = midpoints.step(rows.eps, x, torch.full((n,), j), rows.clamp)
    return float(is_broken(rows.pixels(x)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, default=Path(TEACHER_MODEL), help="the student's teacher")
    parser.add_argument("--prompts", default="fire,heart,wood")
    parser.add_argument("--switch", default="4,6,7")
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("distill-handover"))
    args = parser.parse_args()

    student = load_model(args.student)
    session = Session.load(ModelSource(ckpt=args.teacher, backend="torch", precision="fp32"))
    teacher = session.model
    if not student.guidance_embedding or student.default_steps is None:
        raise SystemExit(f"{args.student} is not a step-distilled student (`glyph-engine distill`).")
    if teacher.guidance_embedding:
        raise SystemExit(f"{args.teacher} is a student; give the teacher it was distilled from.")
    for model in (student, teacher):
        model.unet.float().eval()
    prompts = [p for p in args.prompts.split(",") if p]
    switches = [int(s) for s in args.switch.split(",") if s]
    if any(not 0 < s < student.default_steps for s in switches):
        raise SystemExit(f"switch steps must lie between 1 and {student.default_steps - 1}.")
    table: dict[str, dict[str, float]] = {}
    for title, student_at in mixes(student.default_steps, switches).items():
        table[title] = {p: broken_share(student, session, p, args.n, student_at) for p in prompts}
        print(f"{title}: {table[title]}", file=sys.stderr)

    cpu = cpu_info()
    lines = [
        f"Student {args.student.name} ({student.default_steps} DDIM steps; metadata {student.metadata}) and its "
        f"guided teacher {args.teacher} (2S, two steps per student step), {args.n} glyphs per prompt, "
        f"torch on {cpu.model}; broken share per prompt (`evaluate.is_broken`).",
        "",
        f"| steps taken | {' | '.join(prompts)} | mean |",
        "| --- |" + " ---: |" * (len(prompts) + 1),
    ]
    for title, shares in table.items():
        cells = " | ".join(f"{shares[p]:.1%}" for p in prompts)
        lines.append(f"| {title} | {cells} | {np.mean(list(shares.values())):.1%} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    record = {"student": str(args.student), "metadata": student.metadata, "teacher": str(args.teacher), "n": args.n}
    record |= {"cpu": cpu.model, "flags": list(cpu.flags), "cores": cpu.cores, "broken": table}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    try:
        main()
    except GlyphEngineError as e:
        raise SystemExit(f"error: {e}") from None
