"""make gpu-check, step 5 (generate.json): `generate` on CUDA with the fused and the eager
step, through `Session` as the command runs it: the images agree, and the op is seen
dispatched once per step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.profiler import ProfilerActivity, profile

from glyph_engine.checkpoint import load_model
from glyph_engine.model import DEFAULT_CHECKPOINT
from glyph_engine.session import ModelSource, Session
from glyph_engine.settings import DEFAULT_STEPS, GenerationSettings, StepImpl

OP = "glyph_engine::dpmpp_step"
GENERATE_STEPS = DEFAULT_STEPS  # generate's default for a teacher
GENERATE_TOLERANCE = 2e-2  # pixels in [0, 1]; FP16 U-Net: one ulp of its input moves the path a little


def op_dispatches(run: Callable[[], object]) -> int:
    """How many times `run()` dispatched the fused op (torch's profiler sees every op call)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(event.count for event in prof.key_averages() if event.key == OP)


def generate_on_cuda() -> dict[str, Any]:
    # The torch backend: on a GPU machine it runs on CUDA, as `generate --backend torch` does.
    session = Session.load(ModelSource(backend="torch"), model=load_model(DEFAULT_CHECKPOINT))
    backend = session.backend

    def generate_with(impl: StepImpl) -> tuple[Any, int]:
        settings = GenerationSettings(steps=GENERATE_STEPS, step_impl=impl)
        out = {}
        calls = op_dispatches(lambda: out.setdefault("run", session.generate(["metal", "water"], 4, settings)))
        return out["run"], calls

    (fused, fused_calls), (eager, eager_calls) = generate_with(StepImpl.fused), generate_with(StepImpl.torch)
    dispatches = {"fused": fused_calls, "torch": eager_calls}
    diff = (fused.images - eager.images).abs()
    # One batch (all 8 images at once): one dispatch per step with the op, none without.
    expected = {"fused": GENERATE_STEPS, "torch": 0}
    agree = bool(diff.max() <= GENERATE_TOLERANCE)
    return {
        "passed": agree and dispatches == expected and fused.step_impl is StepImpl.fused,
        "model": session.model.source,
        "backend": f"torch {backend.precision} on {backend.device}",
        "images": len(fused.images),
        "steps": GENERATE_STEPS,
        "step_impl_ran": {"fused": fused.step_impl.value, "torch": eager.step_impl.value},
        "max_abs_difference": diff.max().item(),
        "mean_abs_difference": diff.mean().item(),
        "tolerance": GENERATE_TOLERANCE,
        "op_dispatches": dispatches,
        "expected_dispatches": expected,
    }
