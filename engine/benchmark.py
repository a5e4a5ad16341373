"""Throughput measurements: glyph-engine's backends against the glyffuser's own sampling loop.

Everything is measured in one run on one machine, and every figure is also given as a
ratio to the peer (the glyffuser's published loop: T5 encode, diffusers U-Net and
`DPMSolverMultistepScheduler`, eager PyTorch) on the same weights, batch and steps.
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
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler

from glyph_engine.backends.base import Backend
from glyph_engine.cpu import cpu_info
from glyph_engine.errors import GlyphEngineError
from glyph_engine.files import atomic_path, refuse_non_regular
from glyph_engine.model import Glyffuser
from glyph_engine.pipeline import generate, image_seeds
from glyph_engine.sampler import initial_noise
from glyph_engine.settings import GenerationSettings
from glyph_engine.step import select_step
from glyph_engine.timing import matmul_flops_per_second, median_seconds

PEER = "peer"  # the glyffuser's own loop
PROMPT = "metal"
UNET_TEXT_LENGTH = 16  # tokens in the U-Net-alone measurements


@dataclass(frozen=True)
class BenchConfig:
    """The measured grid, shared by `glyph-engine bench` and the pytest-benchmark suite."""

    batch_sizes: tuple[int, ...] = (16,)
    steps: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    # The published glyffuser loop has no classifier-free guidance: compare unguided.
    guidance: float = 1.0
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


def peer_generate(
    model: Glyffuser,
    scheduler: DPMSolverMultistepScheduler,
    prompts: list[str],
    noise: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """The glyffuser's published sampling loop, eager PyTorch: the reference to beat.

    The scheduler belongs to the pipeline, created once, as in the published pipeline.
    """
    device = peer_device(model)
    # 256 is the published pipeline's literal, whatever the model's own limit.
    tokens = model.tokenizer(prompts, padding="longest", max_length=256, truncation=True, return_tensors="pt")
    mask = tokens.attention_mask.to(device)
    scheduler.set_timesteps(steps)
    with torch.inference_mode():
        text = model.text_encoder(tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
        text = text * mask[..., None]
        image = noise.to(device)
        for t in scheduler.timesteps:
            eps = model.unet(image, t, encoder_hidden_states=text, encoder_attention_mask=mask).sample
            image = scheduler.step(eps, t, image).prev_sample
    return image.clamp(0, 1)


def peer_device(model: Glyffuser) -> torch.device:
    """The peer runs where the model's U-Net lives (backends never move the model)."""
    return next(model.unet.parameters()).device


@dataclass(frozen=True)
class Point:
    backend: str
    device: str
    batch: int
    steps: int
    seconds: float
    images_per_s: float
    ratio_to_peer: float | None
    unet_flops_per_s: float  # U-Net FLOPs done / end-to-end time: a lower bound on U-Net speed
    utilization: float  # of the measured matrix-multiply rate
    outside_unet_ms_per_step: float  # end-to-end time per step minus one U-Net call (sampler, text, copies)


def run_benchmark(
    model: Glyffuser,
    backends: dict[str, Backend],
    config: BenchConfig,
    report: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Generate throughput for the peer and each backend, at every batch size and step count."""
    flops = unet_flops_per_image(model)
    devices = {PEER: peer_device(model), **{name: b.device for name, b in backends.items()}}
    # One ceiling per device the benchmark runs on, measured in that device's compute precision.
    peaks = {str(d): matmul_flops_per_second(d) for d in set(devices.values())}
    points: list[Point] = []
    unet_only: list[dict[str, Any]] = []
    for batch in config.batch_sizes:
        unet_batch = batch * (2 if config.guidance != 1.0 else 1)
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
                    "batch": unet_batch,
                    "seconds": seconds,
                    "images_per_s": unet_batch / seconds,
                    "utilization": flops * unet_batch / seconds / peaks[str(backend.device)][0],
                }
            )
        # The peer runs the same eager PyTorch U-Net as the torch backend, without guidance.
        unet_seconds[PEER] = unet_seconds.get("torch", float("nan")) * (batch / unet_batch)
        for steps in config.steps:
            peer_seconds = None
            for name in (PEER, *backends):
                report(f"{name}: batch {batch}, {steps} steps")
                run = generation(model, backends.get(name), batch, steps, config.guidance)
                seconds = median_seconds(run, config.repeats, config.warmup, devices[name])
                if name == PEER:
                    peer_seconds = seconds
                unet_calls = batch * steps * (2 if config.guidance != 1.0 and name != PEER else 1)
                achieved = flops * unet_calls / seconds
                points.append(
                    Point(
                        name,
                        str(devices[name]),
                        batch,
                        steps,
                        seconds,
                        batch / seconds,
                        peer_seconds / seconds if peer_seconds else None,
                        achieved,
                        achieved / peaks[str(devices[name])][0],
                        1000 * (seconds / steps - unet_seconds[name]),
                    )
                )
    return {
        "machine": machine(),
        "model": {"source": model.source, "sha256": model.sha256, "image_shape": list(model.image_shape)},
        "config": asdict(config),
        # What ran, not what was asked for: a backend that failed to start is not here.
        "backends": {
            name: {"device": str(b.device), "step": select_step(GenerationSettings().step_impl, b.device)[1].value}
            for name, b in backends.items()
        },
        "unet_flops_per_image_step": flops,
        "matmul_flops_per_s": {device: rate for device, (rate, _) in peaks.items()},
        "matmul": {device: how for device, (_, how) in peaks.items()},
        "unet_only": unet_only,
        "points": [asdict(p) for p in points],
    }


def generation(
    model: Glyffuser, backend: Backend | None, batch: int, steps: int, guidance: float
) -> Callable[[], object]:
    """One end-to-end generation of `batch` glyphs: the peer's loop when `backend` is None."""
    if backend is None:
        noise = initial_noise(image_seeds(0, batch), model.image_shape)
        scheduler = DPMSolverMultistepScheduler()
        return lambda: peer_generate(model, scheduler, [PROMPT] * batch, noise, steps)
    settings = GenerationSettings(steps=steps, guidance=guidance)
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
    rates = ", ".join(
        f"{device} {rate / 1e9:.0f} GFLOP/s ({results['matmul'][device]['dtype']})"
        for device, rate in results["matmul_flops_per_s"].items()
    )
    ran = ", ".join(f"{name} on {b['device']} (step: {b['step']})" for name, b in results["backends"].items())
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; "
        f"torch {m['libraries']['torch']}, onnxruntime {m['libraries']['onnxruntime']}.",
        f"Model: {results['model']['source']} ({'x'.join(map(str, results['model']['image_shape']))}); "
        f"U-Net {results['unet_flops_per_image_step'] / 1e9:.2f} GFLOP per image per step; "
        f"matrix-multiply rate: {rates}.",
        f"Backends: {ran}.",
        "",
        "U-Net alone:",
        "",
        "| backend | device | U-Net batch | images/s | of matmul rate |",
        "| --- | --- | ---: | ---: | ---: |",
        *(
            f"| {u['backend']} | {u['device']} | {u['batch']} | {u['images_per_s']:.2f} | {u['utilization']:.1%} |"
            for u in results["unet_only"]
        ),
        "",
        "End to end (`generate`; the peer is the glyffuser's own loop on the same weights):",
        "",
        "| backend | batch | steps | images/s | x peer | U-Net GFLOP/s | of matmul rate | ms/step outside U-Net |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in results["points"]:
        ratio = f"{p['ratio_to_peer']:.2f}x" if p["ratio_to_peer"] else "-"
        lines.append(
            f"| {p['backend']} | {p['batch']} | {p['steps']} | {p['images_per_s']:.2f} | {ratio} | "
            f"{p['unet_flops_per_s'] / 1e9:.1f} | {p['utilization']:.1%} | {p['outside_unet_ms_per_step']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """Draws images/s against steps, one line per (backend, batch); returns the plotted data."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GlyphEngineError("the plot needs matplotlib: pip install 'glyph-engine[bench]'.") from None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    series: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for p in results["points"]:
        series.setdefault((p["backend"], p["batch"]), []).append((p["steps"], p["images_per_s"]))
    for (backend, batch), values in series.items():
        values.sort()
        style = "--" if backend == PEER else "-"
        label = f"{'glyffuser loop (peer)' if backend == PEER else backend}, batch {batch}"
        ax.plot([v[0] for v in values], [v[1] for v in values], style, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    steps = sorted({p["steps"] for p in results["points"]})
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("sampler steps")
    ax.set_ylabel("images / s")
    m = results["machine"]
    ax.set_title(f"{m['cpu']} ({m['cores']} cores), GPU: {m['gpu'] or 'none'}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return series
