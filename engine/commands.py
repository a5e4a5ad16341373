"""What the runtime CLI commands do, as plain functions: validate, load, run, write files.

`export`, `train`, `dataset` and `eval` live beside the code they drive
(`glyph_engine.export.command`, `glyph_engine.training.commands`); the CLI wires them in.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from glyph_engine import __version__
from glyph_engine.backends.base import Backend
from glyph_engine.cache import default_cache_dir
from glyph_engine.cpu import cpu_info
from glyph_engine.errors import GlyphEngineError
from glyph_engine.files import check_writable_file
from glyph_engine.images import check_folder_targets, grid, save_folder, save_png, to_uint8
from glyph_engine.model import DEFAULT_MODEL, EMBEDDED_MODELS, TEACHER_MODEL, Glyffuser, unet_parameter_count
from glyph_engine.pipeline import Generation
from glyph_engine.schedule import SamplerConfig
from glyph_engine.session import ModelSource, Session
from glyph_engine.settings import BackendName, GenerationSettings
from glyph_engine.text import check_prompts

MAX_IMAGES = 4096  # per prompt; more is a typo more often than a plan


@dataclass(frozen=True)
class GenerateRequest:
    """One `generate` call: what to draw, with which model and backend, and where to write it.

    The sampling options are `settings`, defined once in `GenerationSettings`.
    """

    prompts: list[str]
    num_images: int = 16
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    source: ModelSource = field(default_factory=ModelSource)  # the model and how it runs
    out: Path | None = Path("glyphs.png")  # grid; None: no grid
    out_dir: Path | None = None  # one PNG per glyph
    progress: bool = False


def _validate(request: GenerateRequest) -> None:
    """Checks everything that can be checked before minutes of model loading and sampling."""
    check_prompts(request.prompts)
    if not 1 <= request.num_images <= MAX_IMAGES:
        raise GlyphEngineError(f"-n must be from 1 to {MAX_IMAGES} glyphs per prompt (got {request.num_images}).")
    request.settings.validate()
    request.source.check()
    if request.source.backend == BackendName.tensorrt:
        from glyph_engine.backends.tensorrt import require_gpu  # only here: a CPU's warm start never needs it

        require_gpu()  # before loading anything
    if request.out is None and request.out_dir is None:
        raise GlyphEngineError("nothing to write; give --out and/or --out-dir.")
    if request.out is not None:
        check_writable_file(request.out)
    if request.out_dir is not None:
        if request.out_dir.exists() and not request.out_dir.is_dir():
            raise GlyphEngineError(f"--out-dir {request.out_dir} exists and is not a folder.")
        check_writable_file(request.out_dir / "0000.png" if request.out_dir.is_dir() else request.out_dir)
        check_folder_targets(request.out_dir, len(request.prompts) * request.num_images)


def run_generate(request: GenerateRequest) -> list[Path]:
    """Generates glyphs as `request` says and writes them; returns the files written."""
    _validate(request)
    model = request.source.load_model()
    settings = request.settings.resolve(model)  # before minutes of building for this machine
    session = Session.load(request.source, progress=request.progress, model=model)
    total = len(request.prompts) * request.num_images
    batches = -(-total // (settings.batch_size or total))
    with tqdm(
        total=batches * settings.steps, desc="sampling", unit="step", file=sys.stderr, disable=not request.progress
    ) as bar:
        result = session.generate(request.prompts, request.num_images, settings, on_step=bar.update)
    try:
        return _write_outputs(request, result, session.metadata(result))
    except OSError as e:
        raise GlyphEngineError(f"cannot write the glyphs: {e}") from None


def _write_outputs(request: GenerateRequest, result: Generation, common: dict[str, object]) -> list[Path]:
    pixels = to_uint8(result.images)
    written = []
    if request.out is not None:
        save_png(grid(pixels, request.num_images), request.out, {"prompts": list(request.prompts), **common})
        written.append(request.out)
    if request.out_dir is not None:
        per_image = [
            {"prompt": prompt, "index": i, "image_seed": image_seed, **common}
            for i, (prompt, image_seed) in enumerate(zip(result.prompts, result.seeds, strict=True))
        ]
        save_folder(pixels, request.out_dir, per_image)
        written.append(request.out_dir)
    return written


def environment() -> list[tuple[str, str]]:
    """What `glyph-engine info` prints about this machine: libraries, backends, step."""
    import platform

    import torch

    from glyph_engine.step import status_rows

    try:
        import onnxruntime

        ort = f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"
    except ImportError:
        ort = "not installed (pip install 'glyph-engine[onnx]')"
    try:
        import openvino

        ov = openvino.__version__.split("-")[0]
    except ImportError:
        ov = "not installed (pip install openvino)"
    from glyph_engine.backends.tensorrt import load_tensorrt

    trt = load_tensorrt()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    cpu = cpu_info()
    return [
        ("glyph-engine", __version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (GPU: {gpu})"),
        ("cpu", f"{cpu.model}, {cpu.cores} cores ({', '.join(cpu.flags) or 'no AVX2'}{_forced_note()})"),
        ("onnxruntime", ort),
        ("openvino", ov),
        ("artifact cache", str(default_cache_dir())),
        ("tensorrt", f"{trt.import_name} {trt.version}" if trt else "not installed"),
        *status_rows(),
        *(
            (f"embedded model {name}" + (" (default)" if name == DEFAULT_MODEL else ""), _installed(path))
            for name, path in EMBEDDED_MODELS.items()
        ),
    ]


def _installed(path: Path) -> str:
    return str(path) if path.is_file() else "not installed"


def _forced_note() -> str:
    """Says when the flags shown are $GLYPH_ENGINE_CPU_FLAGS's, not the CPU's own."""
    from glyph_engine.cpu import ENV_VAR

    return f"; forced by ${ENV_VAR}" if os.environ.get(ENV_VAR) is not None else ""


def _interval_text(interval: tuple[float, float] | None) -> str:
    return "every step" if interval is None else f"sigma in ({interval[0]:g}, {interval[1]:g}]"


def describe(model: Glyffuser) -> list[tuple[str, str]]:
    """What `glyph-engine info` prints: (field, value) rows."""
    unet, t5 = model.unet.config, model.text_encoder.config
    channels, height, width = model.image_shape
    schedule = model.scheduler_config
    text_params = sum(p.numel() for p in model.text_encoder.parameters())
    attention = [b for b in unet.down_block_types if "CrossAttn" in b]
    return [
        ("source", model.source),
        ("sha256", model.sha256),
        ("U-Net", f"UNet2DConditionModel, {unet_parameter_count(model) / 1e6:.1f}M parameters"),
        ("image", f"{height}x{width}, {channels} channel(s)"),
        ("blocks", f"{tuple(unet.block_out_channels)}, {unet.layers_per_block} layers each"),
        (
            "cross-attention",
            f"dim {unet.cross_attention_dim} in {len(attention)} of {len(unet.down_block_types)} levels",
        ),
        (
            "text encoder",
            f"T5 encoder, {t5.num_layers} layers, d_model {t5.d_model}, {text_params / 1e6:.1f}M parameters",
        ),
        ("tokenizer", f"vocab {model.prompt_tokenizer.vocab_size}, max length {model.max_text_length}"),
        (
            "noise schedule",
            f"{schedule.get('num_train_timesteps', 1000)} steps, {schedule.get('beta_schedule', 'linear')} betas "
            f"{schedule.get('beta_start', 0.0001)}..{schedule.get('beta_end', 0.02)}, "
            f"{schedule.get('prediction_type', 'epsilon')} prediction",
        ),
        ("pixel range", f"[{model.pixel_range[0]:g}, {model.pixel_range[1]:g}] (white = high)"),
        ("unconditional", model.unconditional),
        ("default guidance", f"{model.default_guidance:g}"),
        ("clamp x0", "yes" if model.clamp_x0 else "no"),
        ("center noise", "yes" if model.center_noise else "no"),
        ("guidance interval", _interval_text(model.guidance_interval)),
        *[(k, v) for k, v in model.metadata.items()],
    ]


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise GlyphEngineError(f"{option} takes comma-separated whole numbers, e.g. 1,2,5 (got {text!r}).") from None
    if not values or min(values) < 1:
        raise GlyphEngineError(f"{option} needs numbers of 1 or more (got {text!r}).")
    return values


def run_bench(
    source: ModelSource,
    ckpts: str | None,
    backends: str | None,
    batch: str,
    steps: str,
    samplers: str | None,
    guidance: float | None,
    out: Path,
    repeats: int,
    report: Callable[[str], None],
    fixed_cost: bool = True,
) -> list[str]:
    """Measures and writes results.json, .csv, .md and throughput.png into `out`.

    `ckpts`: comma-separated checkpoints measured side by side (None: `source`'s model, and
    where that is the embedded default student, its teacher too), the peer on the first
    teacher among them. Each model and each backend load as `generate`
    loads them (`source`, with its checkpoint and backend replaced by each benchmarked one),
    so ONNX Runtime and TensorRT read the same export. `fixed_cost`: also time whole `generate`
    processes (imports, loading, compiling; `glyph_engine.startup`) on the first model.
    """
    from glyph_engine.benchmark import BenchConfig, BenchModel, peer_model, result_paths, run_benchmark, write_results
    from glyph_engine.settings import check_guidance

    config = BenchConfig(
        batch_sizes=_int_list(batch, "--batch"),
        steps=_int_list(steps, "--steps"),
        guidance=BenchConfig.guidance if guidance is None else guidance,
        samplers=_names(samplers, "--sampler") if samplers else BenchConfig.samplers,
        repeats=max(1, repeats),
    )
    check_guidance(config.guidance, "--guidance")  # before models load, as the other options
    if max(config.batch_sizes) > MAX_IMAGES:  # generate's -n limit: a larger batch is a typo, not a plan
        raise GlyphEngineError(f"--batch must be from 1 to {MAX_IMAGES} images (got {max(config.batch_sizes)}).")
    if out.exists() and not out.is_dir():
        raise GlyphEngineError(f"--out {out} is a file; give a folder for the results.")
    result_paths(out)
    sources = _bench_sources(source, ckpts)
    for each in sources.values():
        each.check()
    models = {label: each.load_model() for label, each in sources.items()}
    peer_model(models)  # a teacher for the peer, one image size: refused before minutes of backend builds
    for model in models.values():
        for sampler in config.samplers:  # generate's --steps, --guidance and --sampler rules, stated there
            sampling = SamplerConfig(name=sampler)
            GenerationSettings(steps=max(config.steps), guidance=config.guidance, sampler=sampling).resolve(model)
    names = _names(backends, "--backends") if backends else DEFAULT_BENCH_BACKENDS
    benched = [
        BenchModel(label, model, _bench_backends(sources[label], model, names, bool(backends), label, report))
        for label, model in models.items()
    ]
    results = run_benchmark(benched, config, report)
    if fixed_cost:
        from glyph_engine.startup import measure_startup

        results["startup"] = measure_startup(_generate_options(next(iter(sources.values()))), config.repeats, report)
    paths = write_results(results, out)
    return [f"wrote {p}" for p in paths]


def _generate_options(source: ModelSource) -> list[str]:
    """`generate`'s options that load `source` as bench loaded it (its default backend)."""
    options = ["--precision", source.precision.value]
    for flag, value in (
        ("--ckpt", source.ckpt),
        ("--text-encoder", source.text_encoder),
        ("--export-dir", source.export_dir),
    ):
        if value is not None:
            options += [flag, str(value)]
    return options


def _bench_sources(source: ModelSource, ckpts: str | None) -> dict[str, ModelSource]:
    """Each benchmarked model's source by its label: `source` alone, or one per --ckpt."""
    from glyph_engine.benchmark import model_labels

    if ckpts is not None:
        sources = [replace(source, ckpt=Path(c)) for c in _names(ckpts, "--ckpt")]
    elif source.ckpt is None and DEFAULT_MODEL != TEACHER_MODEL:
        # The embedded default is a distilled student: its teacher joins it, as the peer's weights.
        sources = [source, replace(source, ckpt=Path(TEACHER_MODEL))]
    else:
        sources = [source]
    if len(sources) > 1 and source.export_dir is not None:
        raise GlyphEngineError(
            "--export-dir holds one model's export; with several --ckpt leave it out, and each model's "
            "backends read the export beside its checkpoint (NAME-export/)."
        )
    # Labelled by the file each loads: an embedded model's name and its file say the same.
    labels = model_labels([each.checkpoint for each in sources])
    return dict(zip(labels, sources, strict=True))


# Every backend but auto (which is one of them) and inductor, whose first use compiles for
# minutes: it is measured when named.
DEFAULT_BENCH_BACKENDS = tuple(b.value for b in BackendName if b not in (BackendName.auto, BackendName.inductor))


def _bench_backends(
    source: ModelSource,
    model: Glyffuser,
    names: tuple[str, ...],
    asked: bool,
    label: str,
    report: Callable[[str], None],
) -> dict[str, Backend]:
    """The backends `names` that start for `model`; one that does not is skipped and reported,
    unless it was `asked` for by name: then it is a reason to stop."""
    chosen = {}
    for name in names:
        try:
            chosen[name] = Session.load(replace(source, backend=name), model=model).backend
        except GlyphEngineError as e:
            if asked:
                raise
            report(f"{label} {name}: skipped ({e})")
    return chosen


def _names(text: str, option: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise GlyphEngineError(f"{option} takes comma-separated names (got {text!r}).")
    return names
