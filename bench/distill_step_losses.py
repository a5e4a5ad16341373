"""Where a first-halving student still misses its target, step by step: the unweighted MSE of
each of its steps' x0, clamped as the sampler clamps it where the teacher clamps, against
`distill`'s target (two guided 2S teacher steps), on one fixed batch of the glyph dataset
noised as training noises it, for each student given.

    python bench/distill_step_losses.py --data glyphs.npz W/student-guidance.pt W/snapshot.pt \
        [--teacher glyffuser-small] [--batch 32] [--out docs/distill-step-losses]

The clamp scores students trained with either `--x0-loss` alike: one trained with "clamped"
overshoots the page on purpose, and clamping never moves an x0 away from a target inside the
range. (docs/distill-step-losses-run2/run3 were measured unclamped, before this.)
A step whose column does not fall from one snapshot to the next is a step the training is not
improving. The teacher's passes run as distill runs them (bf16 where the CPU has BF16 units);
the column "bf16 target error" is that target's MSE against the same target from fp32 passes,
a floor the students' MSE cannot go under. The students run in fp32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from glyph_engine.checkpoint import load_model
from glyph_engine.cpu import cpu_info
from glyph_engine.model import TEACHER_MODEL
from glyph_engine.training.dataset import load_glyph_set
from glyph_engine.training.distill import Distiller
from glyph_engine.training.distill_config import DistillConfig
from glyph_engine.training.distill_targets import predicted_x0, run_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("students", type=Path, nargs="+")
    parser.add_argument("--data", type=Path, default=Path("glyphs.npz"))
    parser.add_argument("--teacher", type=Path, default=Path(TEACHER_MODEL))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=12345, help="which batch (distill's own draws)")
    parser.add_argument("--out", type=Path, default=Path("distill-step-losses"))
    args = parser.parse_args()

    teacher = load_model(args.teacher)
    config = DistillConfig(batch_size=args.batch)
    distiller = Distiller(teacher, load_glyph_set(args.data), config, torch.device("cpu"))
    students = {p.name: load_model(p) for p in args.students}
    steps = {m.default_steps for m in students.values() if m.default_steps is not None} or {config.final_steps}
    if len(steps) != 1 or not all(m.guidance_embedding for m in students.values()):
        raise SystemExit("give distilled students of one step count (a guidance stage's student takes any).")
    (n,) = steps
    b = distiller.batch(1000, args.seed)  # stage 1000: a batch no training step draws
    mine, _ = distiller.tables(n)
    labels = distiller.labels(b)
    rows = []
    with torch.no_grad():
        for k in range(n):
            i = torch.full((len(b.x0),), k)
            z, sigma = distiller.noised(b, i, n)
            goal = distiller.target(None, b, z, i, n)
            weight = float(sigma.flatten()[0].pow(-2).clamp(min=1))
            row = {"step": k, "timestep": int(mine.timestep[k]), "weight": weight, "bf16 target error": 0.0}
            if distiller.bf16:  # how far the bf16 teacher's target lies from the fp32 one: a floor under the MSE
                distiller.bf16 = False
                row["bf16 target error"] = float((goal - distiller.target(None, b, z, i, n)).pow(2).mean())
                distiller.bf16 = True
            for name, model in students.items():
                eps = run_unet(model.unet.float().eval(), z, mine.timestep[i], b.text, b.mask, **labels)
                row[name] = float((predicted_x0(z, eps, mine, i, distiller.clamp) - goal).pow(2).mean())
            rows.append(row)
            print(row, flush=True)

    names = ["bf16 target error", *students]
    lines = [
        "Unweighted MSE of the sampler's x0 (clamped where the teacher clamps; pixels in its range) of each "
        f"student step against distill's first-halving target, {args.batch} dataset glyphs noised as "
        f"training does (batch seed {args.seed}), teacher "
        f"{args.teacher}, torch on {cpu_info().model}.",
        "",
        f"| step | timestep | loss weight max(SNR, 1) | {' | '.join(names)} |",
        "| ---: | ---: | ---: |" + " ---: |" * len(names),
    ]
    for row in rows:
        cells = " | ".join(f"{row[name]:.4g}" for name in names)
        lines.append(f"| {row['step']} | {row['timestep']} | {row['weight']:.2f} | {cells} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    record = {"students": {p.name: str(p) for p in args.students}, "teacher": str(args.teacher), "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(record | {"cpu": cpu_info().model}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
