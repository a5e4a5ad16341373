"""`glyph-engine export`: a checkpoint to a validated, reusable ONNX artifact folder."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from glyph_engine import __version__
from glyph_engine.errors import GlyphEngineError
from glyph_engine.export.fp16 import T5_FP32_NODES, convert_to_fp16
from glyph_engine.export.validate import summarize, validate
from glyph_engine.export_manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    damaged_files,
    file_entry,
    onnx_files,
    read_manifest,
    write_manifest,
)
from glyph_engine.files import STAGING_LOCK, owned_staging_dir, remove_stale_staging_dirs
from glyph_engine.model import Glyffuser
from glyph_engine.specs import ComponentSpec, text_encoder_spec, unet_spec
from glyph_engine.timing import median_seconds
from glyph_engine.to_onnx import DEFAULT_OPSET, TextEncoderForExport, UNetForExport, export_onnx

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    precisions: tuple[str, ...] = PRECISIONS  # FP32 for CPUs and checking; FP16 for GPUs
    max_images: int = 64  # largest image batch engines serve (the U-Net sees 2x with guidance)
    opt_images: int = 16  # the batch TensorRT tunes for: generate's default -n
    max_prompts: int = 64  # distinct prompts encoded in one call
    max_text_length: int = 256  # the glyffuser tokenizer's limit

    def validate(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise GlyphEngineError(f"unknown precision {bad or self.precisions}; choose from {', '.join(PRECISIONS)}.")
        if self.max_images < 1 or self.max_prompts < 1:
            raise GlyphEngineError(f"--max-batch must be at least 1 (got {self.max_images}).")
        if not 1 <= self.opt_images <= self.max_images:
            raise GlyphEngineError(f"the optimum batch {self.opt_images} must be within 1..{self.max_images}.")
        if not 7 <= self.opset <= 21:
            raise GlyphEngineError(f"--opset must be between 7 and 21 (got {self.opset}); 17 is tested.")


def _versions() -> dict[str, str]:
    return {name: version(name) for name in ("torch", "onnx", "onnxruntime", "diffusers", "transformers")} | {
        "glyph-engine": __version__
    }


def export_key(source_sha256: str, options: ExportOptions) -> str:
    """Hash of everything that determines the exported files."""
    what = {"source": source_sha256, "options": asdict(options), "versions": _versions()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def components(model: Glyffuser, options: ExportOptions) -> list[tuple[ComponentSpec, torch.nn.Module]]:
    return [
        (
            text_encoder_spec(model, options.max_prompts, options.max_text_length),
            TextEncoderForExport(model.text_encoder).eval(),
        ),
        (
            unet_spec(model, options.max_images, options.opt_images, options.max_text_length),
            UNetForExport(model.unet).eval(),
        ),
    ]


def export_model(
    source_sha256: str,
    load: Callable[[], Glyffuser],
    out: Path,
    options: ExportOptions = ExportOptions(),
    force: bool = False,
    report: Callable[[str], None] = logger.info,
) -> tuple[dict[str, Any], bool]:
    """Exports the model `load()` returns (content hash `source_sha256`) into `out`.

    Returns (manifest, reused). An existing export with the same key and intact files is
    reused without loading the model; a stale or damaged one is rebuilt. The new folder is
    built beside `out` and swapped in whole, so `out` is never half-written.
    """
    options.validate()
    key = export_key(source_sha256, options)
    if out.exists() and not out.is_dir():
        raise GlyphEngineError(f"--out {out} is a file; give a folder for the export.")
    for folder in remove_stale_staging_dirs(out, (".partial", ".old")):
        report(f"removed {folder}, left by an export that did not finish")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise GlyphEngineError(
                f"{out} exists and is not a glyph-engine export (no {MANIFEST}); choose another --out or remove it."
            )
        reason = _why_rebuild(out, key, force)
        if reason is None:
            report(f"{out} is up to date (same checkpoint, options and libraries); nothing to do")
            return read_manifest(out), True
        report(f"rebuilding {out}: {reason}")

    out.parent.mkdir(parents=True, exist_ok=True)
    with owned_staging_dir(out, ".partial") as staging:
        model = load()
        if model.sha256 != source_sha256:
            raise GlyphEngineError(f"{model.source} changed while it was being exported; run export again.")
        manifest = _build(model, staging, options, key, report)
        _swap_in(staging, out)
    return manifest, False


def _why_rebuild(out: Path, key: str, force: bool) -> str | None:
    if force:
        return "--force"
    try:
        manifest = read_manifest(out)
    except GlyphEngineError as e:
        return str(e)
    if manifest["key"] != key:
        return "the checkpoint, options or library versions changed"
    problems = damaged_files(out, onnx_files(manifest))
    return f"damaged: {'; '.join(problems)}" if problems else None


def _swap_in(staging: Path, out: Path) -> None:
    """Renames the finished `staging` folder to `out`, moving an existing `out` aside first.

    A failed rename puts the previous `out` back and leaves the new files in `staging` for
    `owned_staging_dir` to remove, so `out` is as it was."""
    try:
        if out.exists():
            with owned_staging_dir(out, ".old") as old:
                out.rename(old / "previous")
                try:
                    staging.rename(out)
                except OSError:
                    (old / "previous").rename(out)
                    raise
        else:
            staging.rename(out)
    except OSError as e:
        # A mount point cannot be renamed (EBUSY); nor can anything in a folder this user cannot write.
        fix = (
            f"it is a mount point or in use; give a folder inside it, such as {out / 'export'}"
            if e.errno == errno.EBUSY
            else f"check that {out.parent} is writable, or choose another --out"
        )
        raise GlyphEngineError(
            f"cannot move the finished export into {out} ({e.strerror or e}), so its new files were removed and "
            f"{out} is as it was; {fix}."
        ) from None
    # The lock went along with the rename; `out` is no staging folder.
    (out / STAGING_LOCK).unlink()


def _build(
    model: Glyffuser, folder: Path, options: ExportOptions, key: str, report: Callable[[str], None]
) -> dict[str, Any]:
    started = time.perf_counter()
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": key,
        "source": {"path": model.source, "sha256": model.sha256},
        "options": asdict(options),
        "exporter": "torch.onnx TorchScript (dynamo=False)",
        "versions": _versions(),
        "components": {},
    }
    for spec, module in components(model, options):
        entry: dict[str, Any] = {**spec.as_dict(), "files": {}, "validation": {}}
        fp32 = folder / f"{spec.name}.fp32.onnx"
        t = time.perf_counter()
        report(f"exporting {spec.name} to ONNX (opset {options.opset})")
        export_onnx(module, spec, fp32, options.opset)
        entry["export_seconds"] = round(time.perf_counter() - t, 2)
        for precision in options.precisions:
            path = folder / f"{spec.name}.{precision}.onnx"
            if precision == "fp16":
                keep = T5_FP32_NODES if spec.name == "text_encoder" else None
                entry["fp32_nodes_in_fp16"] = len(convert_to_fp16(fp32, path, keep))
            report(f"validating {path.name} against PyTorch FP32")
            entry["validation"][precision] = summarize(validate(path, spec, module, precision))
            entry["files"][precision] = file_entry(folder, path)
        if "fp32" not in options.precisions:
            fp32.unlink()
        manifest["components"][spec.name] = entry
    manifest["export_seconds"] = round(time.perf_counter() - started, 2)
    if "fp32" in options.precisions:
        report("timing the U-Net in PyTorch and ONNX Runtime on this CPU (for --backend auto)")
        manifest["cpu_benchmark"] = cpu_benchmark(model, folder / "unet.fp32.onnx", options)
    return write_manifest(folder, manifest)


def cpu_benchmark(model: Glyffuser, unet_onnx: Path, options: ExportOptions, repeats: int = 3) -> dict[str, Any]:
    """Median U-Net call time, PyTorch eager vs ONNX Runtime, at one guided image.

    `--backend auto` reads this to pick the faster CPU backend for this model.
    """
    spec = unet_spec(model, options.max_images, options.opt_images, options.max_text_length)
    inputs = spec.sample_inputs({"batch": 2, "text_length": 16})
    module = UNetForExport(model.unet).eval()
    session = ort.InferenceSession(str(unet_onnx), providers=["CPUExecutionProvider"])
    feed = {k: v.numpy() for k, v in inputs.items()}

    def median_ms(call: Callable[[], object]) -> float:
        return round(1000 * median_seconds(call, repeats, warmup=1, device="cpu"), 3)

    with torch.inference_mode():
        torch_ms = median_ms(lambda: module(*inputs.values()))
    ort_ms = median_ms(lambda: session.run(None, feed))
    return {
        "batch": 2,
        "torch_ms": torch_ms,
        "onnxruntime_ms": ort_ms,
        "preferred": "onnxruntime" if ort_ms < torch_ms else "torch",
    }
