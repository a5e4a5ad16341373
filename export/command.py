"""`glyph-engine export` as a plain function: ONNX export, validation and TensorRT engines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from glyph_engine.backends.tensorrt import TensorRT, load_tensorrt
from glyph_engine.checkpoint import load_model, source_sha256
from glyph_engine.errors import GlyphEngineError
from glyph_engine.export.engine_build import EngineOptions, engine_options, ensure_engines
from glyph_engine.export_manifest import default_export_dir
from glyph_engine.model import checkpoint_path, missing_checkpoint


@dataclass(frozen=True)
class ExportRequest:
    ckpt: Path
    out: Path | None = None  # None: beside the checkpoint
    text_encoder: str | None = None
    precisions: tuple[str, ...] = ("fp32", "fp16")
    opset: int = 17
    max_batch: int = 64
    force: bool = False
    tensorrt: bool | None = None  # None: when TensorRT is installed and there is a target
    compute_capability: str | None = None  # ahead-of-time target (TensorRT-RTX), e.g. "8.6"
    static_batch: int | None = None


def run_export(request: ExportRequest, report: Callable[[str], None]) -> list[str]:
    """Exports (or reuses) the ONNX folder; returns the summary lines to print."""
    try:
        from glyph_engine.export.exporter import ExportOptions, export_model
    except ImportError as e:
        raise GlyphEngineError(
            f"export needs ONNX and ONNX Runtime ({e.name} is missing): pip install 'glyph-engine[onnx]'."
        ) from None

    options = ExportOptions(
        opset=request.opset,
        precisions=request.precisions,
        max_images=request.max_batch,
        opt_images=max(1, min(16, request.max_batch)),
        max_prompts=request.max_batch,
    )
    options.validate()
    engines = _tensorrt_target(request)  # checked before minutes of ONNX export
    # An embedded model's name stands for its file, as everywhere else; its export goes beside
    # that file, where generate's other backends look for it.
    ckpt = checkpoint_path(request.ckpt)
    out = request.out or default_export_dir(ckpt)
    if not ckpt.exists():
        raise GlyphEngineError(missing_checkpoint(ckpt))
    manifest, reused = export_model(
        source_sha256(ckpt, request.text_encoder),
        lambda: load_model(ckpt, request.text_encoder),
        out,
        options,
        force=request.force,
        report=report,
    )
    lines = [f"{'reused' if reused else 'exported'} {out}"]
    if engines is not None:
        trt, engine_opts = engines
        manifest, engines_reused = ensure_engines(trt, out, manifest, engine_opts, request.force, report)
        build = manifest["tensorrt"][engine_opts.name]
        lines[0] = f"{'reused' if reused and engines_reused else 'exported'} {out}"
        for engine in build["engines"].values():
            kinds = ", ".join(f"{k} {v}" for k, v in engine["layer_precisions"].items())
            lines.append(
                f"tensorrt {engine_opts.name}: {engine['path']} {engine['bytes'] / 2**20:.1f} MiB, "
                f"built in {engine['build_seconds']:.1f} s ({build['module']} {build['version']}; {kinds})"
            )
    for name, component in manifest["components"].items():
        for precision, result in component["validation"].items():
            lines.append(
                f"{name:<13} {precision}  max abs error {result['max_abs_error']:.3g}  "
                f"cosine {result['min_cosine']:.6f}  ({len(result['cases'])} shapes vs PyTorch FP32)"
            )
    bench = manifest.get("cpu_benchmark")
    if bench:
        lines.append(
            f"U-Net on this CPU (batch {bench['batch']}): torch {bench['torch_ms']:.1f} ms, "
            f"onnxruntime {bench['onnxruntime_ms']:.1f} ms -> auto uses {bench['preferred']}"
        )
    return lines


def _tensorrt_target(request: ExportRequest) -> tuple[TensorRT, EngineOptions] | None:
    """The TensorRT module and build target, or None when no engines are to be built.

    Explicit --tensorrt/--no-tensorrt decides; by default engines are built when TensorRT is
    installed and there is a target (a GPU here, or --compute-capability).
    """
    wanted = request.tensorrt
    if wanted is None:
        import torch

        explicit = request.compute_capability is not None or request.static_batch is not None
        wanted = explicit or (torch.cuda.is_available() and load_tensorrt() is not None)
    if not wanted:
        return None
    trt = load_tensorrt()
    if trt is None:
        raise GlyphEngineError(
            "TensorRT is not installed: pip install 'glyph-engine[tensorrt]' on a GPU machine, or "
            "'glyph-engine[tensorrt-rtx]' for RTX GPUs and ahead-of-time builds (or pass --no-tensorrt)."
        )
    return trt, engine_options(trt, request.compute_capability, request.static_batch)
