"""TensorRT FP16 engines from the FP16 ONNX files, through the TensorRT Python API.

Engines live in the export folder beside the ONNX files, one build per target (compute
capability, plus the static batch if any), recorded in the manifest under "tensorrt" with
the TensorRT module and version, the profiles and each engine's size and sha256. With
TensorRT 10/11 a timing cache per TensorRT version is kept beside them and reused by later
builds (TensorRT-RTX has none: it tunes kernels on the user's GPU at run time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glyph_engine.backends.tensorrt import TensorRT
from glyph_engine.errors import GlyphEngineError
from glyph_engine.export_manifest import damaged_files, engine_files, file_entry, write_manifest
from glyph_engine.files import atomic_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    target: str  # compute capability, "sm86"; the GPU's own or an ahead-of-time target
    ahead_of_time: bool  # built for `target` without that GPU (TensorRT-RTX)
    static_batch: int | None = None  # images; fixes the U-Net batch (2x with guidance) for CUDA graphs

    @property
    def name(self) -> str:
        return self.target + (f"-b{self.static_batch}" if self.static_batch else "")


def normalize_target(target: str) -> str:
    """'8.6', '86', 'sm86', 'SM_86' -> 'sm86'."""
    digits = "".join(ch for ch in target if ch.isdigit())
    if len(digits) not in (2, 3):
        raise GlyphEngineError(f"--compute-capability {target!r} is not a compute capability such as 8.6 or 12.0.")
    return f"sm{digits}"


def engine_options(trt: TensorRT, compute_capability: str | None, static_batch: int | None) -> EngineOptions:
    """The build target: the given compute capability, else this machine's GPU."""
    if static_batch is not None and static_batch < 1:
        raise GlyphEngineError(f"--static-batch must be at least 1 (got {static_batch}).")
    if compute_capability is not None:
        target = normalize_target(compute_capability)
        trt.compute_capability(target)  # refuses targets the module cannot build for
        return EngineOptions(target, ahead_of_time=True, static_batch=static_batch)
    import torch

    if not torch.cuda.is_available():
        raise GlyphEngineError(
            "TensorRT builds engines for a GPU and this machine has none; pass --compute-capability "
            "(e.g. 8.6) to build ahead of time with TensorRT-RTX, or --no-tensorrt."
        )
    major, minor = torch.cuda.get_device_capability()
    return EngineOptions(f"sm{major}{minor}", ahead_of_time=False, static_batch=static_batch)


def parse_onnx(trt: TensorRT, path: Path):
    """(builder, network, parser) for an ONNX file, strongly typed: precision from the graph."""
    module = trt.module
    log = trt.logger()
    try:
        builder = module.Builder(log)
    except Exception as e:  # noqa: BLE001 - TensorRT raises bare errors without a usable CUDA driver
        raise GlyphEngineError(f"{trt.import_name} cannot create a builder here ({e}).") from None
    network = builder.create_network(1 << int(module.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = module.OnnxParser(network, log)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise GlyphEngineError(f"TensorRT cannot parse {path.name}: {errors}")
    return builder, network, parser


def layer_precisions(trt: TensorRT, network) -> dict[str, int]:
    """Counts of convolutions and matrix multiplies by output type, e.g. {"CONVOLUTION:HALF": 78}."""
    kinds = {trt.module.LayerType.CONVOLUTION: "CONVOLUTION", trt.module.LayerType.MATRIX_MULTIPLY: "MATRIX_MULTIPLY"}
    counts: Counter[str] = Counter()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in kinds:
            counts[f"{kinds[layer.type]}:{layer.get_output(0).dtype.name}"] += 1
    return dict(sorted(counts.items()))


def profile_shapes(name: str, component: dict[str, Any], static_batch: int | None) -> dict[str, list[list[int]]]:
    """Per input, [min, opt, max] shapes from a manifest component record (its spec)."""
    ranges = {axis: list(r) for axis, r in component["ranges"].items()}
    if static_batch is not None and name == "unet":
        ranges["batch"] = [2 * static_batch] * 3
    return {
        t["name"]: [[ranges[d][k] if isinstance(d, str) else d for d in t["dims"]] for k in range(3)]
        for t in component["inputs"]
    }


def build_engine(
    trt: TensorRT,
    onnx_path: Path,
    shapes: dict[str, list[list[int]]],
    plan_path: Path,
    options: EngineOptions,
    cache_path: Path,
) -> dict[str, Any]:
    """Builds one serialized engine into `plan_path` (atomically); returns its manifest record."""
    started = time.perf_counter()
    builder, network, _parser = parse_onnx(trt, onnx_path)
    precisions = layer_precisions(trt, network)
    config = builder.create_builder_config()
    if options.ahead_of_time:
        config.num_compute_capabilities = 1
        config.set_compute_capability(trt.compute_capability(options.target), 0)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    # TensorRT-RTX times kernels on the user's GPU at run time; its timing cache calls are no-ops.
    cache = _load_timing_cache(config, cache_path) if trt.flavour == "tensorrt" else None
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise GlyphEngineError(
            f"TensorRT failed to build {plan_path.name} (run with -v for TensorRT's log; an out-of-memory "
            "build may need a smaller --max-batch)."
        )
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(memoryview(plan))
    if cache is not None:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return {
        **file_entry(plan_path.parent, plan_path),
        "build_seconds": round(time.perf_counter() - started, 2),
        "profile": shapes,
        "layer_precisions": precisions,
    }


def _load_timing_cache(config, path: Path):
    """Reuses the cache from earlier builds; a missing or unreadable one starts afresh."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # noqa: BLE001 - a stale or damaged cache must not stop a build
        logger.warning("ignoring unreadable timing cache %s", path)
        cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        return None
    return cache


def build_key(trt: TensorRT, manifest: dict[str, Any], options: EngineOptions) -> str:
    what = {
        "onnx": {name: c["files"]["fp16"]["sha256"] for name, c in manifest["components"].items()},
        "module": trt.import_name,
        "version": trt.version,
        "options": [options.target, options.ahead_of_time, options.static_batch],
        "profiles": {n: profile_shapes(n, c, options.static_batch) for n, c in manifest["components"].items()},
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def ensure_engines(
    trt: TensorRT,
    folder: Path,
    manifest: dict[str, Any],
    options: EngineOptions,
    force: bool,
    report: Callable[[str], None],
) -> tuple[dict[str, Any], bool]:
    """Builds (or reuses) the engines for `options` in `folder`; returns (manifest, reused)."""
    if any("fp16" not in c["files"] for c in manifest["components"].values()):
        raise GlyphEngineError("TensorRT engines are built from the FP16 ONNX files; export with --precision fp16.")
    key = build_key(trt, manifest, options)
    previous = manifest.get("tensorrt", {}).get(options.name)
    if previous is not None and not force and previous.get("key") == key:
        problems = damaged_files(folder, engine_files(previous))
        if not problems:
            report(f"TensorRT engines for {options.name} are up to date")
            return manifest, True
        report(f"rebuilding TensorRT engines for {options.name}: {'; '.join(problems)}")

    engines = {}
    for name, component in manifest["components"].items():
        plan = folder / f"{name}.{options.name}.plan"
        report(f"building TensorRT engine {plan.name} ({trt.import_name} {trt.version})")
        onnx_path = folder / component["files"]["fp16"]["path"]
        shapes = profile_shapes(name, component, options.static_batch)
        cache = folder / f"timing.{trt.import_name}-{trt.version}.cache"
        engines[name] = build_engine(trt, onnx_path, shapes, plan, options, cache)
    manifest.setdefault("tensorrt", {})[options.name] = {
        "key": key,
        "module": trt.import_name,
        "flavour": trt.flavour,
        "version": trt.version,
        "target": options.target,
        "ahead_of_time": options.ahead_of_time,
        "static_batch": options.static_batch,
        "precision": "fp16 (strongly typed, from the FP16 ONNX; T5 islands FP32)",
        "engines": engines,
    }
    return write_manifest(folder, manifest), False
