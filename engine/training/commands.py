"""`glyph-engine train`, `distill` and `eval` as plain functions."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from glyph_engine.errors import GlyphEngineError
from glyph_engine.files import atomic_path, refuse_non_regular, working_in
from glyph_engine.session import ModelSource, Session
from glyph_engine.settings import GenerationSettings, reference_steps

if TYPE_CHECKING:
    from glyph_engine.training.dataset import GlyphSet
    from glyph_engine.training.distill_config import DistillConfig
    from glyph_engine.training.evaluate import RadicalResult


def run_train(
    data: Path,
    workdir: Path,
    steps: int | None,
    minutes: float | None,
    sample_every: int,
    save_every: int,
    progress: bool,
    init: Path | None = None,
) -> list[str]:
    """Trains (or resumes, or goes on from `init`), then writes WORKDIR/glyffuser.pt and its model card."""
    import json
    import shlex

    from glyph_engine.training.train import STATE, finish, train

    if steps is None and minutes is None:
        raise GlyphEngineError("give --steps and/or --minutes: how long to train in this run.")
    for name, value in (
        ("--steps", steps),
        ("--minutes", minutes),
        ("--sample-every", sample_every),
        ("--save-every", save_every),
    ):
        if value is not None and not value > 0:  # NaN minutes too
            raise GlyphEngineError(f"{name} must be positive (got {value}).")
    for name in (STATE, "glyffuser.pt", "MODEL_CARD.json"):  # refused now rather than after the training
        refuse_non_regular(workdir / name)
    with working_in(workdir, "train"):
        state = train(data, workdir, None, steps, minutes, save_every, sample_every, progress, init=init)
    glyph_count = state.dataset_size
    card = {
        "command": "glyph-engine " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "train",
        "data": f"{data.name}: {glyph_count} glyphs",
        "steps": state.step,
        "epochs": round(state.step * state.config.batch_size / glyph_count, 2),
        "train_hours": round(state.seconds / 3600, 2),
        "final_loss": round(state.losses[-1], 4) if state.losses else None,
        "config": state.config.to_json(),
    }
    out = workdir / "glyffuser.pt"
    digest = finish(state, out, str(out), card)
    with atomic_path(workdir / "MODEL_CARD.json") as tmp:
        tmp.write_text(json.dumps({**card, "sha256": digest}, indent=2))
    return [
        f"step {state.step} ({card['epochs']} epochs, {card['train_hours']} h), loss {card['final_loss']}",
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)",
    ]


def run_distill(
    teacher: Path,
    out: Path,
    data: Path,
    workdir: Path,
    steps: int | None,
    minutes: float | None,
    save_every: int,
    progress: bool,
    config: DistillConfig | None = None,
    text_encoder: str | None = None,
) -> list[str]:
    """Distils (or resumes distilling) TEACHER; once every stage is done, writes OUT and its model
    card (OUT with .card.json). `config` None: the workdir's own settings, else the defaults."""
    import json
    import shlex

    from glyph_engine.training.distill import distill, save_student
    from glyph_engine.training.distill_config import stages
    from glyph_engine.training.distill_state import STATE

    if steps is None and minutes is None:
        raise GlyphEngineError("give --steps and/or --minutes: how long to distil in this run.")
    for name, value in (("--steps", steps), ("--minutes", minutes), ("--save-every", save_every)):
        if value is not None and not value > 0:  # NaN minutes too
            raise GlyphEngineError(f"{name} must be positive (got {value}).")
    card_path = out.with_suffix(".card.json")
    for path in (workdir / STATE, out, card_path):  # refused now rather than after the training
        refuse_non_regular(path)
    with working_in(workdir, "distill"):
        model, state = distill(teacher, data, workdir, config, steps, minutes, save_every, progress, text_encoder)
    plan = stages(state.config)
    hours = round(state.seconds / 3600, 2)
    if state.stage < len(plan):
        stage = plan[state.stage]
        return [
            f"stage {state.stage + 1}/{len(plan)} ({stage.name}): step {state.step}/{stage.steps}, {hours} h so far; "
            f"run again to go on (the state is in {workdir / STATE})"
        ]
    card = {
        "command": "glyph-engine " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "distill",
        "teacher": f"{teacher} (sha256 {model.sha256})",
        "data": str(data.name),
        "stages": {s.name: s.steps for s in plan},
        "default_steps": plan[-1].student_steps,
        "distill_hours": hours,
        "final_losses": {
            s.name: round(losses[-1], 4) if losses else None for s, losses in zip(plan, state.losses, strict=True)
        },
        "config": state.config.to_json(),
    }
    digest = save_student(state, model, plan[-1], out, card)
    with atomic_path(card_path) as tmp:
        tmp.write_text(json.dumps({**card, "sha256": digest}, indent=2))
    return [
        f"{len(plan)} stages done in {hours} h: a {plan[-1].student_steps}-step student, one U-Net pass per step",
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {card_path}",
    ]


def run_snapshot(teacher: Path, workdir: Path, out: Path, text_encoder: str | None = None) -> list[str]:
    """`distill --snapshot OUT`: the stage in progress's averaged weights, written as a student."""
    from glyph_engine.training.distill import snapshot

    refuse_non_regular(out)
    stage, step = snapshot(teacher, workdir, out, text_encoder)
    return [
        f"wrote {out}: the averaged weights of stage {stage.name!r} at step {step}/{stage.steps}",
        f"gate it: glyph-engine eval --ckpt {out} --against {teacher}",
    ]


@dataclass(frozen=True)
class Evaluation:
    report: str  # what `eval` prints
    passed: bool = True  # False: a student failed its gate against the teacher


def run_eval(
    data: Path,
    source: ModelSource,
    num_samples: int,
    settings: GenerationSettings,
    teacher: ModelSource | None = None,
) -> Evaluation:
    """The radical hit rates and caption gain of `source`'s model on `data`, run as `generate`
    runs it. With `teacher`: the teacher's too, at its own defaults but for steps
    (`settings.reference_steps`), and the student's gate (`student_gate`) against it."""
    from glyph_engine.training.dataset import load_glyph_set
    from glyph_engine.training.student_gate import gate

    if num_samples < 1:
        raise GlyphEngineError(f"-n must be at least 1 (got {num_samples}).")
    settings.validate()
    source.check()
    if teacher is not None:
        teacher.check()
    glyphs = load_glyph_set(data)
    report, results = _evaluate(source, glyphs, num_samples, settings)
    if teacher is None:
        return Evaluation(report)
    teacher_report, teacher_results = _evaluate(
        teacher, glyphs, num_samples, GenerationSettings(seed=settings.seed), reference=True
    )
    verdict = gate(teacher_results, results)
    text = f"Student ({source.checkpoint}):\n{report}\n\nTeacher ({teacher.checkpoint}):\n{teacher_report}\n\n{verdict}"
    return Evaluation(text, verdict.passed)


def _evaluate(
    source: ModelSource, glyphs: GlyphSet, num_samples: int, settings: GenerationSettings, reference: bool = False
) -> tuple[str, list[RadicalResult]]:
    """`reference`: the model is a gate's reference, run at `reference_steps`."""
    from glyph_engine.training.evaluate import caption_gain, radical_hit_rates, table

    model = source.load_model()
    if reference:
        settings = replace(settings, steps=reference_steps(model))
    resolved = settings.resolve(model)
    backend = Session.load(source, model=model).backend
    results = radical_hit_rates(model, backend, glyphs, num_samples, resolved)
    sampling = resolved.sampler.describe(resolved.schedule)
    described = f"{sampling}, {resolved.steps} steps, guidance {resolved.guidance:g}"
    report = f"Backend: {backend.name} {backend.precision}; {described}\n\n{table(results)}"
    return f"{report}\n\n{caption_gain(model, backend, glyphs)}", results
