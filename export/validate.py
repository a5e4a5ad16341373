"""Checks an exported ONNX file: onnx.checker, then ONNX Runtime against PyTorch FP32."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from glyph_engine.errors import GlyphEngineError
from glyph_engine.specs import ComponentSpec, Sizes

# FP32: the same math in another order; errors are float32 rounding, ~1e-6 here.
FP32_TOLERANCE = {"max_abs_error": 1e-3, "cosine": 0.99999}
# FP16: 11-bit significands give ~5e-4 relative rounding per op, compounding through tens of
# layers; a cosine of 0.999 keeps glyphs visually unchanged (and is what the T5 must meet),
# and the max error bound (relative to the output's scale) catches isolated blow-ups.
FP16_TOLERANCE = {"max_abs_error": 5e-2, "cosine": 0.999}


@dataclass(frozen=True)
class CheckResult:
    sizes: dict[str, int]
    max_abs_error: float
    cosine: float
    finite: bool
    passed: bool


def validation_sizes(spec: ComponentSpec) -> list[Sizes]:
    """Shapes to check at: not the traced ones, a batch of 1, odd sizes, the longest text."""
    max_text = spec.ranges["text_length"][2]
    cases = [{"batch": 1, "text_length": 5}, {"batch": 3, "text_length": 17}]
    if spec.name == "text_encoder":
        cases.append({"batch": 2, "text_length": max_text})  # long prompts: FP16 overflow shows here
    return cases


def compare(reference: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    ref, act = reference.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
    max_abs = float(np.max(np.abs(ref - act))) if ref.size else 0.0
    denom = float(np.linalg.norm(ref) * np.linalg.norm(act))
    cosine = float(ref @ act / denom) if denom > 0 else float(np.array_equal(ref, act))
    return max_abs, cosine


def validate(
    path: Path, spec: ComponentSpec, module: torch.nn.Module, precision: str, threads: int = 0
) -> list[CheckResult]:
    """Validates one ONNX file; raises GlyphEngineError naming the failure if out of tolerance."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise GlyphEngineError(f"{path.name} is not a valid ONNX model: {str(e).splitlines()[0]}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tolerance = FP16_TOLERANCE if precision == "fp16" else FP32_TOLERANCE
    results = []
    for seed, sizes in enumerate(validation_sizes(spec)):
        inputs = spec.sample_inputs(sizes, seed=seed + 1)
        with torch.no_grad():
            reference = module(*(inputs[t.name] for t in spec.inputs)).numpy()
        (actual,) = session.run(None, {name: value.numpy() for name, value in inputs.items()})
        max_abs, cosine = compare(reference, actual)
        finite = bool(np.isfinite(actual).all())
        scale = max(1.0, float(np.abs(reference).max()))
        passed = finite and max_abs <= tolerance["max_abs_error"] * scale and cosine >= tolerance["cosine"]
        results.append(CheckResult(dict(sizes), max_abs, cosine, finite, passed))
    failed = [r for r in results if not r.passed]
    if failed:
        r = failed[0]
        raise GlyphEngineError(
            f"{path.name} does not match PyTorch FP32 at {r.sizes}: max abs error {r.max_abs_error:.3g}, "
            f"cosine {r.cosine:.6f}{'' if r.finite else ', non-finite outputs'} (tolerance: "
            f"{tolerance['max_abs_error']:g} x output scale, cosine >= {tolerance['cosine']}). "
            "Report this with `glyph-engine info` output; try another --opset."
        )
    return results


def summarize(results: list[CheckResult]) -> dict[str, object]:
    return {
        "max_abs_error": max(r.max_abs_error for r in results),
        "min_cosine": min(r.cosine for r in results),
        "cases": [asdict(r) for r in results],
    }
