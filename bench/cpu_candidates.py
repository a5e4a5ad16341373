"""Every CPU inference candidate for the U-Net, side by side in one run on this machine.

    python bench/cpu_candidates.py [--compile] [--out docs/bench-cpu-candidates.json]

For each candidate: the median time of one U-Net call at the batches `generate "metal" -n 64`
runs (128 on guided steps, 64 on the others), its setup time (export, quantization,
compilation) and its worst relative error against eager FP32 on real sampling trajectories
(the quality gate's measure, `glyph_engine.quality`). Int8 candidates are calibrated on
trajectories of other prompts and seeds than those they are judged on. The CPU, its flags
and the library versions are recorded with the results.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from glyph_engine.benchmark import unet_flops_per_image
from glyph_engine.checkpoint import load_model
from glyph_engine.cpu import cpu_info
from glyph_engine.model import TEACHER_CHECKPOINT
from glyph_engine.quality import (
    CALIBRATION_PROMPTS,
    GATE_PROMPTS,
    MAX_UNET_RELATIVE_ERROR,
    UNetCall,
    relative_errors,
    trajectory_calls,
)
from glyph_engine.session import ModelSource, Session
from glyph_engine.timing import matmul_peak, median_seconds

Run = Callable[[dict[str, np.ndarray]], np.ndarray]


def torch_candidate(unet: torch.nn.Module, channels_last: bool = False, bf16: bool = False) -> Run:
    """The diffusers U-Net on an exported U-Net's feed."""

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(feed["sample"])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return (
                unet(
                    x,
                    torch.from_numpy(feed["timestep"]),
                    encoder_hidden_states=torch.from_numpy(feed["encoder_hidden_states"]),
                    encoder_attention_mask=torch.from_numpy(feed["encoder_attention_mask"]),
                    return_dict=False,
                )[0]
                .float()
                .numpy()
            )

    return run


def exported_unet(ckpt: Path) -> bytes:
    """The FP32 U-Net as `glyph-engine export` writes it (the graph every ONNX candidate runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        command = [sys.executable, "-m", "glyph_engine", "export", str(ckpt), "-o", str(out)]
        subprocess.run([*command, "--precision", "fp32", "--no-tensorrt"], check=True, capture_output=True)
        manifest = json.loads((out / "manifest.json").read_text())
        return (out / manifest["components"]["unet"]["files"]["fp32"]["path"]).read_bytes()


def onnxruntime_candidate(model_bytes: bytes) -> Run:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)[0]


def onnxruntime_int8(model_bytes: bytes, calibration: list[UNetCall]) -> bytes:
    """Static QDQ quantization (per-channel int8 weights, uint8 activations), min-max calibrated."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([call.as_numpy() for call in calibration])

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as tmp:
        source, prepared, target = (Path(tmp) / n for n in ("f.onnx", "p.onnx", "q.onnx"))
        source.write_bytes(model_bytes)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        return target.read_bytes()


def openvino_candidate(ov_model, hint: str, **config: str) -> Run:
    """OpenVINO as the backend compiles it (one LATENCY stream over all cores), `config` on top."""
    import openvino as ov

    settings = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint, **config}
    request = ov.Core().compile_model(ov_model, "CPU", settings).create_infer_request()
    return lambda feed: request.infer(feed)[0]


def openvino_split(ov_model, hint: str, parts: int = 2) -> Run:
    """The batch split into `parts` requests run at once, one stream (and its cores) each."""
    import openvino as ov

    settings = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(parts), "INFERENCE_PRECISION_HINT": hint}
    compiled = ov.Core().compile_model(ov_model, "CPU", settings)
    requests = [compiled.create_infer_request() for _ in range(parts)]

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        rows = np.array_split(np.arange(len(feed["sample"])), parts)
        for request, part in zip(requests, rows, strict=True):
            request.start_async({name: value[part] for name, value in feed.items()})  # every input is per row
        for request in requests:
            request.wait()
        return np.concatenate([request.get_output_tensor(0).data.copy() for request in requests])

    return run


def openvino_int8(model_bytes: bytes, calibration: list[UNetCall]):
    import nncf
    import openvino as ov

    return nncf.quantize(
        ov.Core().read_model(model_bytes),
        nncf.Dataset([call.as_numpy() for call in calibration]),
        subset_size=len(calibration),
        model_type=nncf.ModelType.TRANSFORMER,
    )


def openvino_int8_accuracy_control(model_bytes: bytes, calibration: list[UNetCall], reference: Run):
    """NNCF int8 with accuracy control: calibrated as `openvino_int8`, then layers reverted to
    float, the most sensitive first, until the U-Net's worst relative error (the gate's
    measure) on half of the calibration trajectories is within the 1% gate (half: each
    validation is run once per layer to rank them; the gate's own prompts stay unseen)."""
    import nncf
    import openvino as ov

    # (feed, expected) pairs: the fp32 reference is run once, not at every validation.
    validation = [(call.as_numpy(), torch.from_numpy(reference(call.as_numpy()))) for call in calibration[::2]]

    def validate(compiled, items) -> tuple[float, list[float]]:
        output = lambda item: torch.from_numpy(compiled(item[0])[0])  # noqa: E731
        errors = relative_errors(output, lambda item: item[1], list(items))
        return 1.0 - max(errors), [1.0 - e for e in errors]

    float_model = ov.Core().read_model(model_bytes)
    # NNCF counts the allowed drop from the float model's metric, validated in fp32 (its
    # compile of the float layers): the gate is absolute, so the drop is what is left of it.
    start, _ = validate(ov.Core().compile_model(float_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), validation)
    return nncf.quantize_with_accuracy_control(
        float_model,
        nncf.Dataset([call.as_numpy() for call in calibration]),
        nncf.Dataset(validation),
        validate,
        max_drop=max(start - (1.0 - MAX_UNET_RELATIVE_ERROR), 0.0),
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calibration),
        model_type=nncf.ModelType.TRANSFORMER,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile", action="store_true", help="also torch.compile with freezing (minutes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=None, help="comma-separated candidate names to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/cpu-candidates.json"))
    args = parser.parse_args()

    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU candidates: a GPU machine's GPU stays out of every one
    model = load_model(TEACHER_CHECKPOINT)
    eager = Session.load(ModelSource(backend="torch", precision="fp32"), model=model).backend
    print("recording trajectories", file=sys.stderr)
    calibration = trajectory_calls(model, eager, CALIBRATION_PROMPTS, 2, seed=1)
    gate = trajectory_calls(model, eager, GATE_PROMPTS, 1, seed=2)
    timed = {n: c for n, c in ((c.sample.shape[0], c) for c in trajectory_calls(model, eager, ["metal"], 64, seed=0))}
    unet = model.unet.eval()
    reference = torch_candidate(unet)
    unet_onnx = exported_unet(TEACHER_CHECKPOINT)

    native = "bf16" if cpu_info().has_bf16 else "fp32"  # what `auto` runs here
    per_core = min(2, cpu_info().cores)  # one request per core, up to the two bf16 runs by default
    native_hint = {"bf16": "bf16", "fp32": "f32"}[native]
    builders: list[tuple[str, str, Callable[[], Run]]] = [
        ("torch eager", "fp32", lambda: reference),
        ("torch channels_last", "fp32", lambda: torch_candidate(channels_last_copy(unet), channels_last=True)),
        ("torch autocast", "bf16", lambda: torch_candidate(unet, bf16=True)),
        ("onnxruntime", "fp32", lambda: onnxruntime_candidate(unet_onnx)),
        ("onnxruntime static QDQ", "int8", lambda: onnxruntime_candidate(onnxruntime_int8(unet_onnx, calibration))),
        ("openvino", "fp32", lambda: openvino_candidate(unet_onnx_model(unet_onnx), "f32")),
        ("openvino hint", "bf16", lambda: openvino_candidate(unet_onnx_model(unet_onnx), "bf16")),
        # As `--backend openvino` runs it: the U-Net compiled for each input size a call has.
        ("openvino static sizes", "fp32", lambda: backend_candidate(model, "openvino", "fp32")),
        ("openvino hint static sizes", "bf16", lambda: backend_candidate(model, "openvino", "bf16")),
        # The same, each round's rows as one request per core, all at once (as bf16 runs by default).
        ("openvino static sizes + streams", "fp32", lambda: backend_candidate(model, "openvino", "fp32", per_core)),
        (
            "openvino hint static sizes + streams",
            "bf16",
            lambda: backend_candidate(model, "openvino", "bf16", per_core),
        ),
        ("openvino NNCF", "int8", lambda: openvino_candidate(openvino_int8(unet_onnx, calibration), "f32")),
        (
            "openvino NNCF accuracy control",
            "int8",
            # float layers in fp32, as NNCF validated them
            lambda: openvino_candidate(openvino_int8_accuracy_control(unet_onnx, calibration, reference), "f32"),
        ),  # fmt: skip
    ]
    # OpenVINO's configuration, in the precision `auto` runs here (bf16 with BF16 units).
    builders += [
        (
            "openvino, pinning off",
            native,
            lambda: openvino_candidate(unet_onnx_model(unet_onnx), native_hint, ENABLE_CPU_PINNING="NO"),
        ),  # fmt: skip
        (
            "openvino, 1 thread",
            native,
            lambda: openvino_candidate(unet_onnx_model(unet_onnx), native_hint, INFERENCE_NUM_THREADS="1"),
        ),  # fmt: skip
        ("openvino, batch split in 2 streams", native, lambda: openvino_split(unet_onnx_model(unet_onnx), native_hint)),
    ]
    # AOTInductor as `--backend inductor` builds and runs it (compile time is its setup).
    for inductor_precision in dict.fromkeys(("fp32", native)):
        build = lambda p=inductor_precision: backend_candidate(model, "inductor", p)  # noqa: E731 - one per precision
        builders.append((f"inductor AOT ({inductor_precision})", inductor_precision, build))
    if args.compile:
        builders.insert(3, ("torch.compile freezing", "fp32", lambda: compiled(unet, timed)))
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        builders = [b for b in builders if b[0] in wanted]
        if not builders or "torch eager" not in wanted:
            parser.error("--only names candidates exactly as the table does, 'torch eager' among them")

    results = []
    for name, precision, build in builders:
        print(f"{name} {precision}", file=sys.stderr)
        start = time.perf_counter()
        run = build()
        setup = time.perf_counter() - start
        errors = relative_errors(
            lambda call, run=run: torch.from_numpy(run(call.as_numpy())),
            lambda call: torch.from_numpy(reference(call.as_numpy())),
            gate,
        )
        row = {"candidate": name, "precision": precision, "setup_s": round(setup, 1), "max_rel_error": max(errors)}
        for batch, call in sorted(timed.items(), reverse=True):
            feed = call.as_numpy()
            row[f"b{batch}_s"] = median_seconds(
                lambda feed=feed, run=run: run(feed), args.repeats, warmup=1, device="cpu"
            )
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    # Each candidate against the matrix-multiply peak of its own precision, measured in this run.
    peaks = {p: matmul_peak("cpu", p) for p in dict.fromkeys(r["precision"] for r in results)}
    flops = unet_flops_per_image(model)
    for row in results:
        peak = peaks[row["precision"]].flops_per_s
        row["b128_of_peak"] = None if peak is None else flops * 128 / row["b128_s"] / peak

    cpu = cpu_info()
    report = {
        "cpu": cpu.model,
        "cpu_flags": list(cpu.flags),
        "cores": cpu.cores,
        "python": platform.python_version(),
        "libraries": {n: version(n) for n in ("torch", "onnxruntime", "openvino", "nncf")},
        "unet_flops_per_image": flops,
        "matmul_peaks": {p: peak.flops_per_s for p, peak in peaks.items()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report))


# The OpenVINO backend's requests per round (README, "The CPU fast path").
SPLIT_ENV_VAR = "GLYPH_ENGINE_UNET_REQUESTS"


def backend_candidate(model, name: str, precision: str, requests: int = 1) -> Run:
    """The engine's own backend `name` at `precision`, on a cache of its own: what it builds
    when opened (inductor's compile, OpenVINO's model entry) is the setup; OpenVINO compiles
    each input size at its first call, a warm-up call here. OpenVINO runs each round of rows
    as `requests` requests at once ($GLYPH_ENGINE_UNET_REQUESTS; by default bf16 runs one per
    core, up to two, and fp32 one)."""
    cache = tempfile.TemporaryDirectory()  # held by `run`: sizes are compiled into it later
    source = ModelSource(backend=name, precision=precision, cache_dir=Path(cache.name))
    with mock.patch.dict(os.environ, {SPLIT_ENV_VAR: str(requests)}):  # read when the backend is opened
        backend = Session.load(source, model=model).backend
    return _denoising(backend, cache)


def _denoising(backend, cache: tempfile.TemporaryDirectory) -> Run:
    """`backend`'s U-Net as a candidate; `cache` (where sizes are compiled) lives as long as it."""

    def run(feed: dict[str, np.ndarray], cache=cache) -> np.ndarray:
        x, t = torch.from_numpy(feed["sample"]), int(feed["timestep"][0])
        text, mask = torch.from_numpy(feed["encoder_hidden_states"]), torch.from_numpy(feed["encoder_attention_mask"])
        return backend.denoise(x, t, text, mask).numpy()

    return run


def unet_onnx_model(model_bytes: bytes):
    import openvino as ov

    return ov.Core().read_model(model_bytes)


def channels_last_copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).to(memory_format=torch.channels_last)


def compiled(module: torch.nn.Module, timed: dict[int, UNetCall]) -> Run:
    import torch._inductor.config as inductor

    inductor.freezing = True
    run = torch_candidate(torch.compile(module, dynamic=False))
    for call in timed.values():  # compile each batch shape now: setup time, not call time
        run(call.as_numpy())
    return run


def markdown(report: dict) -> str:
    eager = next(r for r in report["results"] if r["candidate"] == "torch eager")
    lines = [
        f"CPU: {report['cpu']}, {report['cores']} cores, flags {', '.join(report['cpu_flags'])}; "
        + ", ".join(f"{k} {v}" for k, v in report["libraries"].items()),
        "",
        "| candidate | precision | U-Net call, batch 128 (s) | batch 64 (s) | vs eager (b128) | max rel. error vs fp32 "
        "| setup (s) | of its precision's matmul peak (b128) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        of_peak = "n/a" if r.get("b128_of_peak") is None else f"{r['b128_of_peak']:.1%}"
        lines.append(
            f"| {r['candidate']} | {r['precision']} | {r['b128_s']:.3f} | {r['b64_s']:.3f} | "
            f"{eager['b128_s'] / r['b128_s']:.2f}x | {r['max_rel_error']:.2%} | {r['setup_s']:.1f} | {of_peak} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
