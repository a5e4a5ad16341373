"""Quality against steps, teacher and distilled students, each row gated against the teacher.

    python bench/student_quality.py --data glyphs.npz --student W/student-8-steps.pt \
        --student W/student-4-steps.pt [--teacher CKPT] [-n 64] [--out docs/distill-quality] \
        [--keep docs/distill-quality.json] [--student-guidance default,8]

Rows: the teacher at --teacher-steps with its own sampler (DPM-Solver++(2M)) and at
--solver-steps with the higher-order DPM-Solver++(3M) (a training-free reduction), the
guidance stage's student (one pass per step, no step distillation) at --teacher-steps, and
the students at --student-steps: at each count the student trained for it, else the most
distilled one (its row says what it was trained for). Every row is `eval`'s radical
evaluation (the same prompts and seeds) and the gate of `eval --against` against the
teacher at its reference steps (`settings.reference_steps`: 20 for a teacher). Writes
OUT.md (table), OUT.json (every number, the CPU, the backend) and OUT.png (mean lift and
broken share against steps, one line per model).
--student-guidance gives the students' rows at each of these guidance inputs (a student's
default is its teacher's; higher inputs may draw cleaner). --keep PREVIOUS.json reuses the
rows an earlier run measured (same model file, steps, sampler, guidance, -n and backend;
the teacher's reference row included) instead of sampling them again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from glyph_engine.cpu import cpu_info
from glyph_engine.model import DEFAULT_CHECKPOINT
from glyph_engine.schedule import SamplerConfig
from glyph_engine.session import ModelSource, Session
from glyph_engine.settings import GenerationSettings, reference_steps
from glyph_engine.training.dataset import load_glyph_set
from glyph_engine.training.evaluate import HELD_OUT_PROMPTS, RADICAL_PROMPTS, RadicalResult, radical_hit_rates
from glyph_engine.training.student_gate import STRONG_LIFT, gate, mean_broken, mean_nn


@dataclass(frozen=True)
class Row:
    line: str  # which curve of the plot: "teacher, dpmpp-2m", "student"
    ckpt: Path
    steps: int
    sampler: str = "dpmpp-2m"
    trained_steps: int | None = None  # a student's own step count
    guidance: float | None = None  # a student's guidance input; None: its checkpoint's default
    deepcache: int | None = None  # DeepCache's interval (a full U-Net pass every N steps); None: off


def plan(args: argparse.Namespace) -> list[Row]:
    rows = [Row("teacher, dpmpp-2m", args.teacher, s) for s in args.teacher_steps]
    rows += [Row("teacher, dpmpp-3m", args.teacher, s, "dpmpp-3m") for s in args.solver_steps]
    rows += [
        Row(f"teacher, DeepCache every {n}", args.teacher, s, deepcache=n)
        for n in args.deepcache
        for s in args.teacher_steps
    ]
    scales = args.student_guidance or [None]
    if args.guidance_student:
        rows += [
            Row(_line("guidance-distilled, dpmpp-2m", w), args.guidance_student, s, guidance=w)
            for w in scales
            for s in args.teacher_steps
        ]
    trained = {ModelSource(ckpt=p).load_model().default_steps: p for p in args.student}
    if None in trained:
        sys.exit(f"{trained[None]} records no default steps: give a guidance stage's student as --guidance-student.")
    for w in scales:
        for s in args.student_steps if trained else []:
            own = s if s in trained else min(trained)
            rows.append(Row(_line("student", w), trained[own], s, trained_steps=own, guidance=w))
    return rows


def _line(name: str, guidance: float | None) -> str:
    return name if guidance is None else f"{name}, guidance {guidance:g}"


PROMPT_SETS = {"gate": RADICAL_PROMPTS, "held-out": HELD_OUT_PROMPTS}


def evaluate(row: Row, glyphs, n: int, source: ModelSource, prompts: str) -> list[RadicalResult]:
    source = ModelSource(ckpt=row.ckpt, backend=source.backend, precision=source.precision)
    session = Session.load(source)
    backend = session.backend
    if row.deepcache:
        from deepcache import DeepCacheBackend, DeepCacheConfig

        backend = DeepCacheBackend(backend, DeepCacheConfig(row.deepcache))
    settings = GenerationSettings(steps=row.steps, sampler=SamplerConfig(name=row.sampler), guidance=row.guidance)
    settings = settings.resolve(session.model)
    return radical_hit_rates(session.model, backend, glyphs, n, settings, PROMPT_SETS[prompts])


def row_key(row: Row) -> tuple[str, str, int, str]:
    return (row.line, str(row.ckpt), row.steps, row.sampler)


def kept_rows(path: Path, n: int, backend: str, prompts: str) -> dict[tuple[str, str, int, str], list[RadicalResult]]:
    """An earlier run's results by row, if it sampled as this run does."""
    report = json.loads(path.read_text())
    was = (report["n"], report["backend"], report.get("prompt_set", "gate"))
    if was != (n, backend, prompts):
        sys.exit(f"{path} was measured with -n, backend, prompts {was}, not {(n, backend, prompts)}.")
    fields = set(RadicalResult.__dataclass_fields__)
    return {
        (r["line"], r["ckpt"], r["steps"], r["sampler"]): [
            RadicalResult(**{k: v for k, v in p.items() if k in fields}) for p in r["prompts"]
        ]
        for r in report["rows"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("glyphs.npz"))
    parser.add_argument("--teacher", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--student", type=Path, action="append", default=[])
    parser.add_argument("--guidance-student", type=Path, help="student-guidance.pt: rows at --teacher-steps")
    parser.add_argument("--teacher-steps", type=lambda s: [int(x) for x in s.split(",")], default=[5, 10, 20])
    parser.add_argument("--solver-steps", type=lambda s: [int(x) for x in s.split(",") if x], default=[5, 10])
    parser.add_argument("--student-steps", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument(
        "--student-guidance",
        type=lambda s: [None if x == "default" else float(x) for x in s.split(",")],
        help="the students' guidance inputs, one set of rows each; 'default': each checkpoint's own [default]",
    )
    parser.add_argument(
        "--deepcache", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
        help="DeepCache intervals: rows of the teacher at --teacher-steps, a full U-Net pass every N steps (torch)",
    )  # fmt: skip
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument(
        "--prompt-set", choices=list(PROMPT_SETS), default="gate",
        help="gate: eval's eight prompts; held-out: other words for the same radicals (to choose settings on)",
    )  # fmt: skip
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench-results/distill-quality"))
    parser.add_argument("--keep", type=Path, help="an earlier run's OUT.json: its rows are reused, not resampled")
    args = parser.parse_args()
    if not (args.student or args.guidance_student or args.deepcache):
        parser.error("give at least one --student, --guidance-student or --deepcache")

    glyphs = load_glyph_set(args.data)
    source = ModelSource(backend=args.backend, precision=args.precision)
    teacher = Session.load(replace(source, ckpt=args.teacher))
    # As `eval --against` runs it: a teacher at 20 steps even where it records fewer (gated against 20).
    reference_row = Row("teacher, dpmpp-2m", args.teacher, reference_steps(teacher.model))
    # What `evaluate` records as the backend: its name and precision as `source` resolves them.
    backend = f"{teacher.backend.name} {teacher.backend.precision}"
    kept = kept_rows(args.keep, args.n, backend, args.prompt_set) if args.keep else {}
    if row_key(reference_row) in kept:
        reference = kept[row_key(reference_row)]
    else:
        reference = evaluate(reference_row, glyphs, args.n, source, args.prompt_set)
    records = []
    for row in plan(args):
        same = row == reference_row
        if same:
            results = reference
        elif row_key(row) in kept:
            results = kept[row_key(row)]
        else:
            results = evaluate(row, glyphs, args.n, source, args.prompt_set)
        verdict = gate(reference, results)
        records.append(
            {
                **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(row).items()},
                "mean_lift": statistics.mean(r.lift for r in results),
                "strong_prompts": sum(r.lift >= STRONG_LIFT for r in results),
                "broken": mean_broken(results),
                "nn_distance": mean_nn(results)[0],
                "gate": "reference" if same else ("pass" if verdict.passed else "fail"),
                "failed_checks": [c.detail for c in verdict.checks if not c.passed],
                "prompts": [asdict(r) | {"lift": r.lift} for r in results],
            }
        )
        print(f"{row.line} at {row.steps}: {records[-1]['gate']}", file=sys.stderr)

    cpu = cpu_info()
    report = {
        "cpu": cpu.model,
        "cpu_flags": list(cpu.flags),
        "backend": backend,
        "n": args.n,
        "prompt_set": args.prompt_set,
        "rows": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    plot(records, args.out.with_suffix(".png"))
    print(markdown(report))


def markdown(report: dict) -> str:
    prompts = [p["prompt"] for p in report["rows"][0]["prompts"]]
    head = "| model | steps | " + " | ".join(prompts) + f" | at {STRONG_LIFT:g}x | broken | NN distance | gate |"
    lines = [
        f"{report['n']} glyphs per prompt; lift of the radical over its base rate; {report['backend']} on "
        f"{report['cpu']}.",
        "",
        head,
        "| --- | ---: |" + " ---: |" * (len(prompts) + 3) + " --- |",
    ]
    for r in report["rows"]:
        model = r["line"] + (f" (trained for {r['trained_steps']})" if r["trained_steps"] else "")
        lifts = " | ".join(f"{p['lift']:.1f}x" for p in r["prompts"])
        failed = f": {'; '.join(r['failed_checks'])}" if r["failed_checks"] else ""
        lines.append(
            f"| {model} | {r['steps']} | {lifts} | {r['strong_prompts']} | {r['broken']:.1%} | "
            f"{r['nn_distance']:.3f} | {r['gate']}{failed} |"
        )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lift, broken) = plt.subplots(1, 2, figsize=(10, 4))
    for line in dict.fromkeys(r["line"] for r in records):
        rows = sorted((r for r in records if r["line"] == line), key=lambda r: r["steps"])
        steps = [r["steps"] for r in rows]
        lift.plot(steps, [r["mean_lift"] for r in rows], marker="o", label=line)
        broken.plot(steps, [100 * r["broken"] for r in rows], marker="o", label=line)
    steps = sorted({r["steps"] for r in records})
    for ax, label in ((lift, "mean radical lift (x)"), (broken, "broken samples (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlabel("sampler steps (one U-Net pass each for the student)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    lift.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
