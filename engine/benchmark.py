"""Throughput measurements: glyph-engine's backends against the glyffuser's own sampling loop.

Everything is measured in one run on one machine, and every figure is also given as a
ratio to the peer (`glyph_engine.peer`: the glyffuser's published loop, eager PyTorch) on
the same weights, batch, steps and guidance. U-Net rates are given against the
matrix-multiply peak of the precision each system computes in, measured in the same run.
"""

from __future__ import annotations

import csv
import io
import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from glyph_engine.backends.base import Backend
from glyph_engine.cpu import cpu_info
from glyph_engine.errors import GlyphEngineError
from glyph_engine.files import atomic_path, refuse_non_regular
from glyph_engine.model import Glyffuser
from glyph_engine.peer import PEER_SAMPLER, Peer
from glyph_engine.pipeline import generate, image_seeds
from glyph_engine.sampler import initial_noise
from glyph_engine.samplers import DEFAULT_SAMPLER
from glyph_engine.schedule import SamplerConfig
from glyph_engine.settings import GUIDANCE_OFF, GenerationSettings
from glyph_engine.timing import matmul_peak, median_seconds

PEER = "peer"  # the glyffuser's own loop
PROMPT = "metal"
UNET_TEXT_LENGTH = 16  # tokens in the U-Net-alone measurements
T = TypeVar("T")


@dataclass(frozen=True)
class BenchConfig:
    """The measured grid, shared by `glyph-engine bench` and the pytest-benchmark suite."""

    batch_sizes: tuple[int, ...] = (16,)
    steps: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    # The scale both glyph-engine and the peer run at. 1 (unguided): the published glyffuser
    # loop has no classifier-free guidance; any other scale doubles the peer's batch at every
    # step and glyph-engine's at the steps of the model's guidance interval.
    guidance: float = GUIDANCE_OFF
    samplers: tuple[str, ...] = (DEFAULT_SAMPLER,)  # glyph-engine's; the peer is diffusers' 2M
    repeats: int = 3  # timed runs per point (median reported)
    warmup: int = 1


def machine() -> dict[str, Any]:
    cpu = cpu_info()
    libraries = {}
    for name in ("glyph-engine", "torch", "diffusers", "transformers", "onnxruntime", "openvino", "nncf", "numpy"):
        try:
            libraries[name] = version(name)
        except PackageNotFoundError:
            libraries[name] = None
    return {
        "cpu": cpu.model,
        "cpu_features": {"torch_capability": torch.backends.cpu.get_cpu_capability(), "flags": list(cpu.flags)},
        "cores": cpu.cores,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "libraries": libraries,
    }


def unet_flops_per_image(model: Glyffuser, text_length: int = 16) -> int:
    """FLOPs of one U-Net evaluation of one image (torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    channels, height, width = model.image_shape
    unet = model.unet
    param = next(unet.parameters())
    x = torch.zeros(1, channels, height, width, device=param.device, dtype=param.dtype)
    text = torch.zeros(1, text_length, model.text_encoder.config.d_model, device=param.device, dtype=param.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(x, 500, encoder_hidden_states=text)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class Point:
    backend: str
    device: str
    precision: str  # the U-Net's, as it ran
    sampler: str
    step: str  # the sampler step that ran: "fused", "torch", or "diffusers" (the peer's scheduler)
    guidance: float  # the same for the peer and every backend of a run
    batch: int
    steps: int
    seconds: float
    images_per_s: float
    ratio_to_peer: float
    unet_rows: float  # U-Net rows per generate (guidance doubles a batch at the steps it guides)
    unet_flops_per_s: float  # U-Net FLOPs done / end-to-end time: a lower bound on U-Net speed
    utilization: float | None  # of the matmul peak in its own precision; None: no honest peak here
    outside_unet_ms_per_step: float  # end-to-end time per step minus its U-Net calls (sampler, text, copies)


class CountedBackend:
    """A backend that counts the U-Net rows it runs: what a generate really asked of the
    U-Net, guidance interval included."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name, self.device, self.precision = inner.name, inner.device, inner.precision
        self.rows = 0

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.inner.encode_text(input_ids, attention_mask)

    def denoise(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor) -> Tensor:
        self.rows += x.shape[0]
        return self.inner.denoise(x, timestep, text, mask)


def run_benchmark(
    model: Glyffuser,
    backends: dict[str, Backend],
    config: BenchConfig,
    report: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Generate throughput for the peer and each backend with each sampler, at every batch
    size and step count, all at `config.guidance`."""
    flops = unet_flops_per_image(model)
    peer = Peer(model)
    runs_on = {PEER: (str(peer.device), peer.precision)}
    runs_on |= {name: (str(b.device), b.precision) for name, b in backends.items()}
    # One ceiling per device and precision that runs: a U-Net is only held to its own precision's.
    peaks = {where: matmul_peak(*where) for where in dict.fromkeys(runs_on.values())}

    def utilization(name: str, flops_per_s: float) -> float | None:
        peak = peaks[runs_on[name]].flops_per_s
        return None if peak is None else flops_per_s / peak

    points: list[Point] = []
    unet_only: list[dict[str, Any]] = []
    for batch in config.batch_sizes:
        unet_batch = batch * (2 if config.guidance != GUIDANCE_OFF else 1)
        unet_seconds = {}
        for name, backend in backends.items():
            report(f"{name}: U-Net alone, batch {unet_batch}")
            seconds = median_seconds(
                unet_call(model, backend, unet_batch), config.repeats, config.warmup, backend.device
            )
            unet_seconds[name] = seconds
            unet_only.append(
                {
                    "backend": name,
                    "device": str(backend.device),
                    "precision": backend.precision,
                    "batch": unet_batch,
                    "seconds": seconds,
                    "images_per_s": unet_batch / seconds,
                    "utilization": utilization(name, flops * unet_batch / seconds),
                }
            )
        # The peer runs the same eager PyTorch U-Net as the torch backend.
        unet_seconds[PEER] = unet_seconds.get("torch", float("nan"))

        for steps in config.steps:
            report(f"{PEER}: batch {batch}, {steps} steps")
            run = generation(model, None, batch, steps, config.guidance)
            peer_seconds = median_seconds(run, config.repeats, config.warmup, peer.device)
            # (system, sampler, step that ran, seconds, U-Net rows per generate)
            measured = [(PEER, PEER_SAMPLER, "diffusers", peer_seconds, Peer.unet_rows(batch, steps, config.guidance))]
            for sampler in config.samplers:
                for name, backend in backends.items():
                    report(f"{name}: batch {batch}, {steps} steps, {sampler}")
                    counted = CountedBackend(backend)
                    run = generation(model, counted, batch, steps, config.guidance, sampler)
                    seconds, last, calls = timed(run, config, backend.device)
                    # The step that ran, as the generation reports it; rows per generate.
                    measured.append((name, sampler, last.step_impl.value, seconds, counted.rows / calls))
            for name, sampler, step, seconds, rows in measured:
                achieved = flops * rows / seconds
                points.append(
                    Point(
                        name,
                        *runs_on[name],
                        sampler,
                        step,
                        config.guidance,
                        batch,
                        steps,
                        seconds,
                        batch / seconds,
                        peer_seconds / seconds,
                        rows,
                        achieved,
                        utilization(name, achieved),
                        1000 * (seconds - rows / unet_batch * unet_seconds[name]) / steps,
                    )
                )
    return {
        "machine": machine(),
        "model": {"source": model.source, "sha256": model.sha256, "image_shape": list(model.image_shape)},
        "config": asdict(config),
        # What ran, not what was asked for: a backend that failed to start is not here.
        "peer": {"device": str(peer.device), "precision": peer.precision, "sampler": PEER_SAMPLER},
        "backends": {name: {"device": str(b.device), "precision": b.precision} for name, b in backends.items()},
        "unet_flops_per_image_step": flops,
        "matmul_peaks": [asdict(peak) for peak in peaks.values()],
        "unet_only": unet_only,
        "points": [asdict(p) for p in points],
    }


def timed(run: Callable[[], T], config: BenchConfig, device: torch.device) -> tuple[float, T, int]:
    """The median seconds of `run` (as `config` says), what its last call returned, and how
    many calls were made (warm-up included)."""
    results: list[T] = []
    seconds = median_seconds(lambda: results.append(run()), config.repeats, config.warmup, device)
    return seconds, results[-1], len(results)


def generation(
    model: Glyffuser,
    backend: Backend | None,
    batch: int,
    steps: int,
    guidance: float,
    sampler: str = DEFAULT_SAMPLER,
) -> Callable[[], Any]:
    """One end-to-end generation of `batch` glyphs at `guidance`: the peer's loop (which is
    diffusers' DPM-Solver++(2M) whatever `sampler` says) when `backend` is None. Each call
    returns what it drew (a Generation for glyph-engine)."""
    if backend is None:
        peer = Peer(model)
        noise = initial_noise(image_seeds(0, batch), model.image_shape)
        return lambda: peer.generate([PROMPT] * batch, noise, steps, guidance)
    settings = GenerationSettings(steps=steps, guidance=guidance, sampler=SamplerConfig(name=sampler))
    return lambda: generate(model, backend, [PROMPT], batch, settings)


def unet_call(model: Glyffuser, backend: Backend, batch: int) -> Callable[[], object]:
    """One U-Net call of `batch` images through the backend, inputs already on its device."""
    channels, height, width = model.image_shape
    gen = torch.Generator().manual_seed(0)
    width_text = model.text_encoder.config.d_model
    x = torch.randn(batch, channels, height, width, generator=gen).to(backend.device)
    text = torch.randn(batch, UNET_TEXT_LENGTH, width_text, generator=gen).to(backend.device)
    mask = torch.ones(batch, UNET_TEXT_LENGTH, dtype=torch.long, device=backend.device)
    return lambda: backend.denoise(x, 500, text, mask)


RESULT_FILES = ("results.json", "results.csv", "results.md", "throughput.png")


def result_paths(out: Path) -> list[Path]:
    """Where `write_results` writes, each refused now if it could not be replaced (a device,
    FIFO or folder there): `bench` checks before it measures for minutes."""
    paths = [out / name for name in RESULT_FILES]
    for path in paths:
        refuse_non_regular(path, "another --out folder")
    return paths


def write_results(results: dict[str, Any], out: Path) -> list[Path]:
    """results.json, results.csv, results.md and throughput.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = result_paths(out)
    with atomic_path(paths[0]) as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(results["points"][0]))
    writer.writeheader()
    writer.writerows(results["points"])
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(buffer.getvalue())
    with atomic_path(paths[2]) as tmp:
        tmp.write_text(markdown(results))
    plot(results, paths[3])
    return paths


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    peaks = ", ".join(map(peak_text, results["matmul_peaks"]))
    systems = {PEER: results["peer"], **results["backends"]}
    ran = ", ".join(f"{name} on {b['device']} in {b['precision']}" for name, b in systems.items())
    guidance = results["config"]["guidance"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; "
        f"torch {m['libraries']['torch']}, onnxruntime {m['libraries']['onnxruntime']}.",
        f"Model: {results['model']['source']} ({'x'.join(map(str, results['model']['image_shape']))}); "
        f"U-Net {results['unet_flops_per_image_step'] / 1e9:.2f} GFLOP per image per step; "
        f"matrix-multiply peaks, per precision, in the same run: {peaks}.",
        f"Backends: {ran}; each U-Net rate is given against the peak of its own precision.",
        f"Guidance {guidance:g} for the peer and every backend"
        + (
            " (unguided)."
            if guidance == GUIDANCE_OFF
            else ": the peer doubles its batch at every step, glyph-engine at the steps of the model's guidance "
            "interval."
        ),
        "",
        "U-Net alone:",
        "",
        "| backend | device | precision | U-Net batch | images/s | of its precision's peak |",
        "| --- | --- | --- | ---: | ---: | ---: |",
        *(
            f"| {u['backend']} | {u['device']} | {u['precision']} | {u['batch']} | {u['images_per_s']:.2f} "
            f"| {percent(u['utilization'])} |"
            for u in results["unet_only"]
        ),
        "",
        "End to end (`generate`; the peer is the glyffuser's own loop on the same weights, at the same guidance):",
        "",
        "| backend | precision | sampler | step | batch | steps | images/s | x peer | U-Net GFLOP/s "
        "| of its precision's peak | ms/step outside U-Net |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in results["points"]:
        lines.append(
            f"| {p['backend']} | {p['precision']} | {p['sampler']} | {p['step']} | {p['batch']} | {p['steps']} "
            f"| {p['images_per_s']:.2f} | {p['ratio_to_peer']:.2f}x | {p['unet_flops_per_s'] / 1e9:.1f} "
            f"| {percent(p['utilization'])} | {p['outside_unet_ms_per_step']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def peak_text(peak: dict[str, Any]) -> str:
    rate = peak["flops_per_s"]
    measured = f"{rate / 1e9:.0f} GFLOP/s ({peak['size']}^3)" if rate else f"not measured ({peak['note']})"
    return f"{peak['device']} {peak['precision']} {measured}"


def percent(fraction: float | None) -> str:
    """A utilization, or "-" where its precision has no honest peak here (the results say why)."""
    return "-" if fraction is None else f"{fraction:.1%}"


def plot(results: dict[str, Any], path: Path) -> dict[tuple[str, str, int], list[tuple[int, float]]]:
    """Draws images/s against steps, one line per (backend, sampler, batch); returns the plotted data."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GlyphEngineError("the plot needs matplotlib: pip install 'glyph-engine[bench]'.") from None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    series: dict[tuple[str, str, int], list[tuple[int, float]]] = {}
    precisions = {}
    for p in results["points"]:
        series.setdefault((p["backend"], p["sampler"], p["batch"]), []).append((p["steps"], p["images_per_s"]))
        precisions[p["backend"]] = p["precision"]
    several = len({sampler for _, sampler, _ in series}) > 1
    for (backend, sampler, batch), values in series.items():
        values.sort()
        style = "--" if backend == PEER else "-"
        name = "glyffuser loop (peer)" if backend == PEER else backend
        label = f"{name} {precisions[backend]}{f', {sampler}' if several else ''}, batch {batch}"
        ax.plot([v[0] for v in values], [v[1] for v in values], style, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    steps = sorted({p["steps"] for p in results["points"]})
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("sampler steps")
    ax.set_ylabel("images / s")
    m = results["machine"]
    guidance = results["config"]["guidance"]
    ax.set_title(f"{m['cpu']} ({m['cores']} cores), GPU: {m['gpu'] or 'none'}; guidance {guidance:g}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return series
