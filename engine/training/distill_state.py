"""What `glyph-engine distill` keeps between runs: the state file.

The whole state is `workdir/distill_state.pt` (plain tensors and data, loaded with
weights_only=True). The teacher is not in it: each run loads it from TEACHER again, and
the state records its sha256 so that a workdir is never resumed against another teacher.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

from glyph_engine.errors import GlyphEngineError
from glyph_engine.files import atomic_path
from glyph_engine.training.distill_config import DistillConfig, option_name, stages
from glyph_engine.training.train import read_state

STATE = "distill_state.pt"
# -2: the first halving learns from the guided teacher's 2S steps, no longer from the guidance
# stage's student, so a state of the first kind cannot go on as it was started.
FORMAT = "glyph-engine-distill-state-2"


@dataclass
class DistillState:
    config: DistillConfig
    teacher_sha256: str  # the TEACHER this workdir distils
    student: UNet2DConditionModel  # the U-Net being trained (takes the guidance scale)
    stage_teacher: UNet2DConditionModel | None  # the previous halving's student, frozen; None before the second halving
    optimizer: torch.optim.Optimizer
    ema: EMAModel
    stage: int = 0  # index into stages(config); len(stages) once all are done
    step: int = 0  # optimizer steps taken in this stage
    seconds: float = 0.0
    losses: list[list[float]] = field(default_factory=list)  # per stage: mean loss per 50 steps
    # This halving's running mean x0 MSE per student step ("balanced" weighting); None before its
    # first step. NaN: a step not drawn yet.
    step_scale: torch.Tensor | None = None

    def steps_done(self) -> int:
        """Optimizer steps over all stages, what --steps counts."""
        return sum(s.steps for s in stages(self.config)[: self.stage]) + self.step


def fresh_optimizer(state: DistillState) -> None:
    """A new optimizer and weight average for the student, as each stage starts."""
    params = list(state.student.parameters())
    state.optimizer = torch.optim.AdamW(params, lr=state.config.learning_rate, weight_decay=0.0)
    state.ema = EMAModel(params, decay=state.config.ema_decay, foreach=True)


def new_state(config: DistillConfig, teacher_sha256: str, student: UNet2DConditionModel) -> DistillState:
    state = DistillState(config, teacher_sha256, student, None, None, None, losses=[[]])  # type: ignore[arg-type]
    fresh_optimizer(state)
    return state


def save_state(state: DistillState, workdir: Path) -> None:
    payload = {
        "format": FORMAT,
        "config": state.config.to_json(),
        "teacher_sha256": state.teacher_sha256,
        "student": state.student.state_dict(),
        "stage_teacher": None if state.stage_teacher is None else state.stage_teacher.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "ema": state.ema.state_dict(),
        "stage": state.stage,
        "step": state.step,
        "seconds": state.seconds,
        "losses": [list(stage) for stage in state.losses],
        "step_scale": state.step_scale,
    }
    with atomic_path(workdir / STATE) as tmp:
        torch.save(payload, tmp)


def load_state(
    workdir: Path, teacher_sha256: str, student: UNet2DConditionModel, config: DistillConfig | None
) -> DistillState:
    """The saved state, its weights loaded into `student` (built as a new state builds it)."""
    path = workdir / STATE
    payload = _read_state(path)
    try:
        saved = DistillConfig.from_json(payload["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise _unusable_state(path, f"bad or missing settings: {e}") from None
    if config is not None and config != saved:
        differ = ", ".join(
            f"{option_name(f.name)} {getattr(saved, f.name)}"
            for f in fields(DistillConfig)
            if getattr(saved, f.name) != getattr(config, f.name)
        )
        raise GlyphEngineError(
            f"{path} was started with other settings ({differ}); give the same ones, or use another --workdir."
        )
    if payload.get("teacher_sha256") != teacher_sha256:
        raise GlyphEngineError(
            f"{path} distils another teacher (sha256 {str(payload.get('teacher_sha256'))[:12]}); "
            "give the TEACHER it was started with, or use another --workdir."
        )
    try:
        return _restore(saved, teacher_sha256, student, payload)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:  # missing parts, wrong shapes
        raise _unusable_state(path, " ".join(str(e).split())[:200]) from None


def _read_state(path: Path) -> dict[str, Any]:
    payload = read_state(path, _unusable_state, "distillation state")  # CRC-32s, weights_only, one line
    if payload.get("format") == "glyph-engine-distill-state":
        raise GlyphEngineError(
            f"{path} was started by an older glyph-engine, whose first halving learnt from another teacher; "
            "start a new --workdir (the students of its finished stages stay usable)."
        )
    if payload.get("format") != FORMAT:
        raise _unusable_state(path, "not a distillation state")
    return payload


def _unusable_state(path: Path, reason: str) -> GlyphEngineError:
    return GlyphEngineError(
        f"{path} is damaged or incomplete ({reason}) and cannot be resumed. Delete it to start this --workdir "
        "from scratch; the students of finished stages beside it stay usable."
    )


def _restore(
    config: DistillConfig, teacher_sha256: str, student: UNet2DConditionModel, payload: dict[str, Any]
) -> DistillState:
    student.load_state_dict(payload["student"])
    stage_teacher = None
    if payload["stage_teacher"] is not None:
        stage_teacher = frozen_copy(student)
        stage_teacher.load_state_dict(payload["stage_teacher"])
    state = new_state(config, teacher_sha256, student)
    state.stage_teacher = stage_teacher
    state.optimizer.load_state_dict(payload["optimizer"])  # moved to the parameters' device
    state.ema.load_state_dict(payload["ema"])
    state.ema.to(next(student.parameters()).device)
    state.stage, state.step, state.seconds = int(payload["stage"]), int(payload["step"]), float(payload["seconds"])
    state.losses = [[float(v) for v in stage] for stage in payload["losses"]]
    scale = payload.get("step_scale")  # absent from states saved before the setting
    state.step_scale = None if scale is None else scale.float().to(next(student.parameters()).device)
    if not 0 <= state.stage <= len(stages(config)) or len(state.losses) != min(state.stage + 1, len(stages(config))):
        raise ValueError(f"stage {state.stage} does not fit the settings' stages")
    return state


def frozen_copy(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A copy of `unet` in eval mode without gradients: a teacher."""
    teacher = copy.deepcopy(unet).eval()
    teacher.requires_grad_(False)
    return teacher
