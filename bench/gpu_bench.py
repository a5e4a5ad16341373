"""make gpu-check, step 6 (bench-gpu.json, bench-gpu.md): the peer (`glyph_engine.peer`, the
glyffuser's own loop, FP16 U-Net on the GPU), glyph-engine eager and glyph-engine fastest on
the full-size glyffuser and the embedded model, all at one guidance scale per case. U-Net
rates are given against the matmul peak of the precision each system ran in, measured in the
same run (`timing.matmul_peak`)."""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from gpu_results import one_line

from glyph_engine.backends.base import Backend
from glyph_engine.benchmark import BenchConfig, CountedBackend, timed, unet_flops_per_image
from glyph_engine.checkpoint import load_model
from glyph_engine.model import GLYFFUSER_UNET_CONFIG, TEACHER_CHECKPOINT, Glyffuser, unet_parameter_count
from glyph_engine.peer import Peer
from glyph_engine.session import ModelSource, Session
from glyph_engine.settings import DEFAULT_STEPS, GenerationSettings, StepImpl
from glyph_engine.timing import MatmulPeak, matmul_peak

from factories import T5_SMALL_CONFIG, make_glyffuser_folder, make_text_encoder_folder

PROMPT = "metal"
BENCH_STEPS = DEFAULT_STEPS  # generate's default for a teacher
FULL_SIZE_GLYPHS = 64
EMBEDDED_BATCHES = (64, 256, 1024)
# Random weights carry no trained guidance scale; any scale other than 1 costs the same. The
# embedded model's own default.
FULL_SIZE_GUIDANCE = 4.0
TIMING = BenchConfig(repeats=3, warmup=1)


@dataclass(frozen=True)
class Prepared:
    """A system ready to time: one generate, and how to read what it did."""

    run: Callable[[], Any]
    precision: str  # the U-Net's, as it ran
    unet_rows: Callable[[int], float]  # U-Net rows per generate, given how many generates ran
    step: Callable[[Any], str]  # the sampler step that ran, from what a generate returned


System = Callable[[], Prepared]  # prepared only when timed: one system's weights on the GPU at a time


def peer(model: Glyffuser, batch: int, guidance: float) -> System:
    """The glyffuser's own loop on the GPU, its U-Net in FP16 (no channels_last, no graphs: the
    published loop has neither), T5 in FP32, guided at every step unless `guidance` is 1."""

    def make() -> Prepared:
        loop = Peer(model, torch.device("cuda", torch.cuda.current_device()), torch.float16)
        noise = torch.randn(batch, *model.image_shape, generator=torch.Generator().manual_seed(0))
        rows = Peer.unet_rows(batch, BENCH_STEPS, guidance)
        return Prepared(
            lambda: loop.generate([PROMPT] * batch, noise, BENCH_STEPS, guidance),
            loop.precision,
            lambda _: rows,
            lambda _: "diffusers",
        )

    return make


def glyph_engine(model: Glyffuser, open_backend: Callable[[], Any], batch: int, guidance: float, eager: bool) -> System:
    """glyph-engine's generate at `guidance`, with the model's guidance interval; `eager`: the
    eager PyTorch step instead of the fused op. U-Net rows are counted as they run."""

    def make() -> Prepared:
        backend = CountedBackend(open_backend())
        settings = GenerationSettings(
            steps=BENCH_STEPS, guidance=guidance, step_impl=StepImpl.torch if eager else StepImpl.auto
        )
        session = Session(model, backend)
        return Prepared(
            lambda: session.generate([PROMPT], batch, settings),
            backend.precision,
            lambda runs: backend.rows / runs,
            lambda generation: generation.step_impl.value,
        )

    return make


def eager_backend(model: Glyffuser) -> Backend:
    """The torch backend on CUDA without CUDA graphs (`--backend torch --no-cuda-graph`)."""
    return Session.load(ModelSource(backend="torch", cuda_graph=False), model=model).backend


def measure(system: System, batch: int, flops: int, peak: Callable[[str], MatmulPeak]) -> dict[str, Any]:
    """Median time of one generate of `batch` glyphs, with the system alone on the GPU."""
    gc.collect()
    torch.cuda.empty_cache()  # the previous system's weights and blocks
    prepared = system()
    torch.cuda.reset_peak_memory_stats()
    seconds, last, runs = timed(prepared.run, TIMING, torch.device("cuda"))
    unet_images = prepared.unet_rows(runs)
    achieved = flops * unet_images / seconds
    ceiling = peak(prepared.precision).flops_per_s
    return {
        "precision": prepared.precision,
        "step": prepared.step(last),
        "images_per_s": batch / seconds,
        "seconds_per_generate": seconds,
        "unet_images_per_generate": unet_images,
        "tflops": achieved / 1e12,
        "of_peak": None if ceiling is None else achieved / ceiling,  # of its own precision's
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def bench_case(
    name: str, model: Glyffuser, batch: int, guidance: float | None, peak: Callable[[str], MatmulPeak]
) -> dict[str, Any]:
    flops = unet_flops_per_image(model)
    scale = model.default_guidance if guidance is None else guidance  # the peer's and glyph-engine's
    chosen = {}

    def fastest() -> Any:
        backend = Session.load(ModelSource(), model=model).backend  # what `generate` picks here
        chosen["fastest"] = f"{backend.name} {backend.precision} on {backend.device}"
        return backend

    systems: dict[str, System] = {
        "peer": peer(model, batch, scale),
        "eager": glyph_engine(model, lambda: eager_backend(model), batch, scale, eager=True),
        "fastest": glyph_engine(model, fastest, batch, scale, eager=False),
    }
    results = {}
    for system, make in systems.items():
        try:
            results[system] = measure(make, batch, flops, peak)
        except Exception as e:  # out of memory at batch 1024, say: the other systems and cases still run
            results[system] = {"error": f"{type(e).__name__}: {one_line(e)}"}

    def get(system: str, key: str) -> float | None:
        return results[system].get(key)

    return {
        "name": name,
        "device": torch.cuda.get_device_name(),
        "images_per_s": get("fastest", "images_per_s"),
        "peer_images_per_s": get("peer", "images_per_s"),
        "eager_images_per_s": get("eager", "images_per_s"),
        "seconds_per_generate": get("fastest", "seconds_per_generate"),
        "tflops": get("fastest", "tflops"),
        "peak_memory_gib": get("fastest", "peak_memory_gib"),
        "batch": batch,
        "steps": BENCH_STEPS,
        "guidance": scale,
        "guidance_interval": model.guidance_interval,  # glyph-engine's default; the peer guides every step
        "fastest": chosen.get("fastest"),
        "unet_gflop_per_image": flops / 1e9,
        "systems": results,
    }


def full_size_model(folder: Path) -> Glyffuser:
    """The published glyffuser's configuration (131M U-Net, 128x128) and T5-small's shape, random weights."""
    unet = make_glyffuser_folder(folder / "glyffuser", GLYFFUSER_UNET_CONFIG)
    return load_model(unet, str(make_text_encoder_folder(folder / "t5", T5_SMALL_CONFIG)))


def workloads(folder: Path) -> Iterator[tuple[str, Glyffuser, int, float | None]]:
    """(name, model, batch, guidance: None for the model's own) for each benchmark case."""

    def described(model: Glyffuser, what: str) -> str:
        _, height, width = model.image_shape
        return f"{what} ({unet_parameter_count(model) / 1e6:.0f}M, {height}x{width})"

    full = full_size_model(folder)
    yield (
        f"{described(full, 'full-size glyffuser')}, {FULL_SIZE_GLYPHS} glyphs",
        full,
        FULL_SIZE_GLYPHS,
        FULL_SIZE_GUIDANCE,
    )
    embedded = load_model(TEACHER_CHECKPOINT)
    for batch in EMBEDDED_BATCHES:
        yield f"{described(embedded, 'embedded model')}, batch {batch}", embedded, batch, None


def bench_gpu() -> dict[str, Any]:
    peaks: dict[str, MatmulPeak] = {}

    def peak(precision: str) -> MatmulPeak:
        """The GPU's matmul peak in `precision`, measured once, when a system first runs in it."""
        if precision not in peaks:
            gc.collect()
            torch.cuda.empty_cache()
            peaks[precision] = matmul_peak("cuda", precision)
        return peaks[precision]

    with tempfile.TemporaryDirectory() as tmp:
        entries = [bench_case(name, model, batch, g, peak) for name, model, batch, g in workloads(Path(tmp))]
    return {
        "passed": all("error" not in s for e in entries for s in e["systems"].values()),
        "matmul_peaks": [asdict(p) for p in peaks.values()],
        "entries": entries,
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def bench_markdown(result: dict[str, Any], env: dict[str, Any]) -> str:
    peaks = ", ".join(
        f"{p['precision'].upper()} {p['flops_per_s'] / 1e12:.0f} TFLOP/s"
        if p["flops_per_s"]
        else f"{p['precision'].upper()} not measured ({p['note']})"
        for p in result.get("matmul_peaks", [])
    )
    lines = [
        f"GPU: {env.get('gpu')}; torch {env.get('torch')}, CUDA {env.get('torch_cuda')}; matrix multiply measured in "
        f"the same run, in each precision that ran: {peaks or '-'}.",
        f"{BENCH_STEPS} steps, the same guidance for every system of a case: the peer doubles the batch at every "
        f"step, glyph-engine at the steps of the model's guidance interval (U-Net images: per generate). Medians of "
        f"{TIMING.repeats} runs after {TIMING.warmup} warm-up; TFLOP/s: U-Net FLOPs done / time, against the peak of "
        "the system's own precision.",
        "",
        "| case | system | precision | images/s | x peer | s per generate | U-Net images | TFLOP/s "
        "| of its precision's peak | peak memory GiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in result.get("entries", []):
        peer_rate = entry["peer_images_per_s"]
        for system, s in entry["systems"].items():
            label = f"fastest ({entry['fastest']})" if system == "fastest" else system
            label += f", step {s['step']}" if "step" in s else ""
            if "error" in s:
                lines.append(f"| {entry['name']} | {label} | | {s['error']} | | | | | | |")
                continue
            ratio = f"{s['images_per_s'] / peer_rate:.2f}x" if peer_rate else "-"
            of_peak = "-" if s["of_peak"] is None else f"{s['of_peak']:.1%}"
            lines.append(
                f"| {entry['name']} | {label} | {s['precision']} | {s['images_per_s']:.1f} | {ratio} "
                f"| {s['seconds_per_generate']:.3f} | {s['unet_images_per_generate']:.0f} | {s['tflops']:.1f} "
                f"| {of_peak} | {s['peak_memory_gib']:.2f} |"
            )
    return "\n".join(lines) + "\n"
