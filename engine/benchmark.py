"""Throughput measurements: glyph-engine's backends against the glyffuser's own sampling loop.

Everything is measured in one run on one machine, and every figure is also given as a
ratio to the peer (`glyph_engine.peer`: the glyffuser's published loop, eager PyTorch) at
the same batch, steps and guidance. The peer runs the teacher's weights; a distilled student
measured beside it is held to the same peer, so its ratio is what distillation buys. U-Net
rates are given against the matrix-multiply peak of the precision each system computes in,
measured in the same run.
"""

from __future__ import annotations

import csv
import io
import json
import platform
from collections.abc import Callable, Mapping, Sequence
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
from glyph_engine.model import Glyffuser, guidance_labels
from glyph_engine.peer import PEER_SAMPLER, Peer
from glyph_engine.pipeline import generate, image_seeds
from glyph_engine.sampler import initial_noise
from glyph_engine.samplers import DEFAULT_SAMPLER
from glyph_engine.schedule import SamplerConfig
from glyph_engine.settings import GUIDANCE_OFF, GenerationSettings
from glyph_engine.startup import startup_markdown
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
    # step and a teacher's at the steps of its guidance interval, and is a student's input.
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
    # A student's U-Net needs its guidance input; the scale's value costs nothing.
    labels = guidance_labels(GUIDANCE_OFF, 1, param.device) if model.guidance_embedding else None
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(x, 500, encoder_hidden_states=text, class_labels=labels)
    return int(counter.get_total_flops())


def rows_per_call(model: Glyffuser, batch: int, guidance: float) -> int:
    """U-Net rows of one call for `batch` images at `guidance`: a guided teacher's are doubled
    (its unconditional half), a student's never are (the scale is its input)."""
    return batch * (2 if guidance != GUIDANCE_OFF and not model.guidance_embedding else 1)


def model_labels(paths: Sequence[Path]) -> list[str]:
    """A short name for each checkpoint, unique in the run: the file's stem or the folder's
    name, numbered from the second of a name (run1/student.pt, run2/student.pt)."""
    labels: list[str] = []
    for path in paths:
        base = path.name if path.is_dir() else path.stem
        label, n = base, 1
        while label in labels:
            n += 1
            label = f"{base}-{n}"
        labels.append(label)
    return labels


def peer_model(models: Mapping[str, Glyffuser]) -> str:
    """The label of the model the peer runs, the first teacher (the published loop has no
    guidance input); refuses models that draw different images, whose images/s do not compare."""
    shapes = {label: "x".join(map(str, m.image_shape)) for label, m in models.items()}
    if len(set(shapes.values())) > 1:
        drawn = ", ".join(f"{label} {shape}" for label, shape in shapes.items())
        raise GlyphEngineError(f"the models draw different images ({drawn}); bench models of one image size.")
    teacher = next((label for label, m in models.items() if not m.guidance_embedding), None)
    if teacher is None:
        raise GlyphEngineError(
            "the peer (the glyffuser's own loop) runs only a teacher and every model given is a distilled "
            "student; pass its teacher too, e.g. --ckpt teacher.pt,student.pt."
        )
    return teacher


@dataclass(frozen=True)
class BenchModel:
    """One model of a run: its label in every result row, and the backends it loaded on
    (one that failed to start is not here)."""

    label: str
    model: Glyffuser
    backends: dict[str, Backend]


@dataclass(frozen=True)
class Point:
    model: str  # its label; the peer's points name the teacher it ran
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

    def denoise(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor, guidance: float | None = None) -> Tensor:
        self.rows += x.shape[0]
        return self.inner.denoise(x, timestep, text, mask, guidance=guidance)


System = tuple[str, str]  # (model label, backend name or PEER)
Measured = tuple[System, str, str, float, float]  # system, sampler, step that ran, seconds, U-Net rows per generate


def run_benchmark(
    models: Sequence[BenchModel],
    config: BenchConfig,
    report: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Generate throughput for the peer (on the first teacher) and each model on each of its
    backends with each sampler, at every batch size and step count, all at `config.guidance`."""
    label = peer_model({m.label: m.model for m in models})
    teacher = next(m for m in models if m.label == label)
    flops = {m.label: unet_flops_per_image(m.model) for m in models}
    peer = Peer(teacher.model)
    runs_on = {(teacher.label, PEER): (str(peer.device), peer.precision)}
    runs_on |= {(m.label, name): (str(b.device), b.precision) for m in models for name, b in m.backends.items()}
    # One ceiling per device and precision that runs: a U-Net is only held to its own precision's.
    peaks = {where: matmul_peak(*where) for where in dict.fromkeys(runs_on.values())}

    def utilization(system: System, unet_rows_per_s: float) -> float | None:
        peak = peaks[runs_on[system]].flops_per_s
        return None if peak is None else flops[system[0]] * unet_rows_per_s / peak

    points: list[Point] = []
    unet_only: list[dict[str, Any]] = []
    for batch in config.batch_sizes:
        row_seconds: dict[System, float] = {}  # the U-Net alone, per row
        for m in models:
            unet_batch = rows_per_call(m.model, batch, config.guidance)
            for name, seconds in unet_alone(m, unet_batch, config, report).items():
                row_seconds[m.label, name] = seconds / unet_batch
                where = dict(zip(("device", "precision"), runs_on[m.label, name], strict=True))
                unet_only.append(
                    {
                        "model": m.label,
                        "backend": name,
                        **where,
                        "batch": unet_batch,
                        "seconds": seconds,
                        "images_per_s": unet_batch / seconds,
                        "utilization": utilization((m.label, name), unet_batch / seconds),
                    }
                )
        # The peer runs the same eager PyTorch U-Net as the torch backend.
        row_seconds[teacher.label, PEER] = row_seconds.get((teacher.label, "torch"), float("nan"))
        for steps in config.steps:
            measured = generate_times(peer, teacher, models, batch, steps, config, report)
            peer_seconds = measured[0][3]
            for system, sampler, step, seconds, rows in measured:
                points.append(
                    Point(
                        *system,
                        *runs_on[system],
                        sampler,
                        step,
                        config.guidance,
                        batch,
                        steps,
                        seconds,
                        batch / seconds,
                        peer_seconds / seconds,
                        rows,
                        flops[system[0]] * rows / seconds,
                        utilization(system, rows / seconds),
                        1000 * (seconds - rows * row_seconds[system]) / steps,
                    )
                )
    return {
        "machine": machine(),
        "models": [model_entry(m, flops[m.label]) for m in models],
        "config": asdict(config),
        # What ran, not what was asked for: a backend that failed to start is not here.
        "peer": {
            "model": teacher.label,
            "device": str(peer.device),
            "precision": peer.precision,
            "sampler": PEER_SAMPLER,
        },
        "backends": {
            name: {"device": str(b.device), "precision": b.precision} for m in models for name, b in m.backends.items()
        },
        "matmul_peaks": [asdict(peak) for peak in peaks.values()],
        "unet_only": unet_only,
        "points": [asdict(p) for p in points],
    }


def unet_alone(m: BenchModel, unet_batch: int, config: BenchConfig, report: Callable[[str], None]) -> dict[str, float]:
    """The median seconds of one U-Net call of `unet_batch` rows on each of the model's backends."""
    seconds = {}
    for name, backend in m.backends.items():
        report(f"{m.label} {name}: U-Net alone, batch {unet_batch}")
        run = unet_call(m.model, backend, unet_batch, config.guidance)
        seconds[name] = median_seconds(run, config.repeats, config.warmup, backend.device)
    return seconds


def generate_times(
    peer: Peer,
    teacher: BenchModel,
    models: Sequence[BenchModel],
    batch: int,
    steps: int,
    config: BenchConfig,
    report: Callable[[str], None],
) -> list[Measured]:
    """One generate of `batch` glyphs in `steps` steps: the peer's (on the teacher) first, then
    each model's on each backend with each sampler, its U-Net rows counted as they ran."""
    report(f"{teacher.label} {PEER}: batch {batch}, {steps} steps")
    run = generation(teacher.model, None, batch, steps, config.guidance)
    peer_seconds = median_seconds(run, config.repeats, config.warmup, peer.device)
    rows = Peer.unet_rows(batch, steps, config.guidance)
    measured: list[Measured] = [((teacher.label, PEER), PEER_SAMPLER, "diffusers", peer_seconds, rows)]
    for sampler in config.samplers:
        for m in models:
            for name, backend in m.backends.items():
                report(f"{m.label} {name}: batch {batch}, {steps} steps, {sampler}")
                counted = CountedBackend(backend)
                run = generation(m.model, counted, batch, steps, config.guidance, sampler)
                seconds, last, calls = timed(run, config, backend.device)
                # The step that ran, as the generation reports it; rows per generate.
                measured.append(((m.label, name), sampler, last.step_impl.value, seconds, counted.rows / calls))
    return measured


def model_entry(m: BenchModel, flops: int) -> dict[str, Any]:
    """What the results record of one model: which weights, and what a student was trained for."""
    return {
        "label": m.label,
        "source": m.model.source,
        "sha256": m.model.sha256,
        "image_shape": list(m.model.image_shape),
        "student": m.model.guidance_embedding,
        "default_steps": m.model.default_steps,  # a student's own; None: the settings' default
        "unet_flops_per_image_step": flops,
        "backends": list(m.backends),
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
    # Resolved once, not in every timed call: a student run off its trained steps warns once.
    settings = GenerationSettings(steps=steps, guidance=guidance, sampler=SamplerConfig(name=sampler)).resolve(model)
    return lambda: generate(model, backend, [PROMPT], batch, settings)


def unet_call(model: Glyffuser, backend: Backend, batch: int, guidance: float = GUIDANCE_OFF) -> Callable[[], object]:
    """One U-Net call of `batch` images through the backend, inputs already on its device; a
    student's U-Net gets `guidance` as its input, as generate feeds it."""
    channels, height, width = model.image_shape
    gen = torch.Generator().manual_seed(0)
    width_text = model.text_encoder.config.d_model
    x = torch.randn(batch, channels, height, width, generator=gen).to(backend.device)
    text = torch.randn(batch, UNET_TEXT_LENGTH, width_text, generator=gen).to(backend.device)
    mask = torch.ones(batch, UNET_TEXT_LENGTH, dtype=torch.long, device=backend.device)
    scale = guidance if model.guidance_embedding else None
    return lambda: backend.denoise(x, 500, text, mask, guidance=scale)


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
        f"Models: {'; '.join(map(model_text, results['models']))}. "
        f"The peer runs {results['peer']['model']}; matrix-multiply peaks, per precision, in the same run: {peaks}.",
        f"Backends: {ran}; each U-Net rate is given against the peak of its own precision.",
        f"Guidance {guidance:g} for the peer and every model"
        + (
            " (unguided)."
            if guidance == GUIDANCE_OFF
            else ": the peer doubles its batch at every step, a teacher's generate at the steps of its guidance "
            "interval; a student takes it as an input, one pass per step."
        ),
        "",
        "U-Net alone:",
        "",
        "| model | backend | device | precision | U-Net batch | images/s | of its precision's peak |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
        *(
            f"| {u['model']} | {u['backend']} | {u['device']} | {u['precision']} | {u['batch']} "
            f"| {u['images_per_s']:.2f} | {percent(u['utilization'])} |"
            for u in results["unet_only"]
        ),
        "",
        "End to end (`generate`; the peer is the glyffuser's own loop on the teacher's weights, at the same guidance):",
        "",
        "| model | backend | precision | sampler | step | batch | steps | images/s | x peer | U-Net GFLOP/s "
        "| of its precision's peak | ms/step outside U-Net |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in results["points"]:
        lines.append(
            f"| {p['model']} | {p['backend']} | {p['precision']} | {p['sampler']} | {p['step']} | {p['batch']} "
            f"| {p['steps']} | {p['images_per_s']:.2f} | {p['ratio_to_peer']:.2f}x | {p['unet_flops_per_s'] / 1e9:.1f} "
            f"| {percent(p['utilization'])} | {p['outside_unet_ms_per_step']:.1f} |"
        )
    if results.get("startup") is not None:
        lines += ["", startup_markdown(results["startup"])]
    return "\n".join(lines) + "\n"


def model_text(model: dict[str, Any]) -> str:
    """One model of the run, as results.md describes it."""
    steps = model["default_steps"]
    kind = "student" + (f", trained for {steps} steps" if steps else "") if model["student"] else "teacher"
    return (
        f"{model['label']} ({kind}; {model['source']}, {'x'.join(map(str, model['image_shape']))}, "
        f"U-Net {model['unet_flops_per_image_step'] / 1e9:.2f} GFLOP per image per step)"
    )


def peak_text(peak: dict[str, Any]) -> str:
    rate = peak["flops_per_s"]
    measured = f"{rate / 1e9:.0f} GFLOP/s ({peak['size']}^3)" if rate else f"not measured ({peak['note']})"
    return f"{peak['device']} {peak['precision']} {measured}"


def percent(fraction: float | None) -> str:
    """A utilization, or "-" where its precision has no honest peak here (the results say why)."""
    return "-" if fraction is None else f"{fraction:.1%}"


def plot(results: dict[str, Any], path: Path) -> dict[tuple[str, str, str, int], list[tuple[int, float]]]:
    """Draws images/s against steps, one line per (model, backend, sampler, batch), so a
    teacher's and a student's curves share the axes; returns the plotted data."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GlyphEngineError("the plot needs matplotlib: pip install 'glyph-engine[bench]'.") from None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    series: dict[tuple[str, str, str, int], list[tuple[int, float]]] = {}
    precisions = {}
    for p in results["points"]:
        key = (p["model"], p["backend"], p["sampler"], p["batch"])
        series.setdefault(key, []).append((p["steps"], p["images_per_s"]))
        precisions[p["model"], p["backend"]] = p["precision"]
    several = len({sampler for _, _, sampler, _ in series}) > 1
    for (model, backend, sampler, batch), values in series.items():
        values.sort()
        style = "--" if backend == PEER else "-"
        name = "glyffuser loop (peer)" if backend == PEER else backend
        label = f"{model}: {name} {precisions[model, backend]}{f', {sampler}' if several else ''}, batch {batch}"
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
