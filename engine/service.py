"""What the CLI commands do, as plain functions: validate, load, run, write files."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from glyph_engine import __version__
from glyph_engine.artifacts import default_export_dir
from glyph_engine.backends import create_backend
from glyph_engine.checkpoint import load_model, source_sha256
from glyph_engine.errors import GlyphEngineError
from glyph_engine.export.tensorrt_build import EngineOptions, engine_options, ensure_engines
from glyph_engine.files import check_writable_file
from glyph_engine.images import grid, save_folder, save_png, to_uint8
from glyph_engine.model import DEFAULT_CHECKPOINT, Glyffuser, unet_parameter_count
from glyph_engine.pipeline import Generation, GenerationSettings, generate
from glyph_engine.schedule import SamplerConfig
from glyph_engine.trt import TensorRT, load_tensorrt

MAX_IMAGES = 4096  # per prompt; more is a typo more often than a plan


@dataclass(frozen=True)
class GenerateRequest:
    prompts: list[str]
    ckpt: Path | None
    num_images: int = 16
    steps: int = 20
    guidance: float | None = None
    seed: int = 0
    text_encoder: str | None = None
    backend: str = "auto"
    export_dir: Path | None = None  # None: beside the checkpoint
    cuda_graph: bool = False  # TensorRT only
    batch_size: int | None = None
    out: Path | None = Path("glyphs.png")  # grid; None: no grid
    out_dir: Path | None = None  # one PNG per glyph
    spacing: str = "linspace"
    karras: bool = False
    order: int = 2
    step_impl: str = "auto"
    clamp_x0: bool | None = None  # None: the checkpoint's default
    progress: bool = False


def _validate(request: GenerateRequest) -> None:
    """Checks everything that can be checked before minutes of model loading and sampling."""
    if not request.prompts or any(not p.strip() for p in request.prompts):
        raise GlyphEngineError('a prompt is empty; give each prompt some text, e.g. glyph-engine generate "metal".')
    if not 1 <= request.num_images <= MAX_IMAGES:
        raise GlyphEngineError(f"-n must be from 1 to {MAX_IMAGES} glyphs per prompt (got {request.num_images}).")
    if request.steps < 1:
        raise GlyphEngineError(f"--steps must be at least 1 (got {request.steps}).")
    if request.seed < 0:
        raise GlyphEngineError(f"--seed must be 0 or more (got {request.seed}).")
    if request.step_impl not in ("auto", "fused", "torch"):
        raise GlyphEngineError(f"--step-impl must be auto, fused or torch (got {request.step_impl}).")
    if request.order not in (1, 2):
        raise GlyphEngineError(f"--order must be 1 or 2 (got {request.order}).")
    if request.guidance is not None and not request.guidance >= 0:  # also catches NaN
        raise GlyphEngineError(f"--guidance must be 0 or more (got {request.guidance}); 1 turns guidance off.")
    if request.batch_size is not None and request.batch_size < 1:
        raise GlyphEngineError(f"--batch-size must be at least 1 (got {request.batch_size}).")
    if request.backend == "tensorrt":
        from glyph_engine.backends.tensorrt import require_gpu

        require_gpu()  # before loading anything
    if request.ckpt is None and not DEFAULT_CHECKPOINT.is_file():
        raise GlyphEngineError(
            "no model given and no embedded model installed; pass --ckpt with a glyph-engine checkpoint (.pt) "
            "or a glyffuser diffusers folder."
        )
    if request.out is None and request.out_dir is None:
        raise GlyphEngineError("nothing to write; give --out and/or --out-dir.")
    if request.out is not None:
        check_writable_file(request.out)
    if request.out_dir is not None:
        if request.out_dir.exists() and not request.out_dir.is_dir():
            raise GlyphEngineError(f"--out-dir {request.out_dir} exists and is not a folder.")
        check_writable_file(request.out_dir / "0000.png" if request.out_dir.is_dir() else request.out_dir)


def run_generate(request: GenerateRequest) -> list[Path]:
    """Generates glyphs as `request` says and writes them; returns the files written."""
    _validate(request)
    ckpt = request.ckpt or DEFAULT_CHECKPOINT
    model = load_model(ckpt, request.text_encoder)
    num_train = len(model.alphas_cumprod)
    if request.steps > num_train:
        raise GlyphEngineError(f"--steps must be at most {num_train}, the model's training timesteps.")
    sampler = SamplerConfig(
        order=request.order,
        spacing=request.spacing,
        karras_sigmas=request.karras,
        steps_offset=int(model.scheduler_config.get("steps_offset", 0)),
    )
    settings = GenerationSettings(
        steps=request.steps,
        guidance=request.guidance,
        seed=request.seed,
        batch_size=request.batch_size,
        sampler=sampler,
        step_impl=request.step_impl,
        clamp_x0=request.clamp_x0,
    )
    export_dir = request.export_dir or default_export_dir(ckpt)
    backend = create_backend(request.backend, model, export_dir, request.cuda_graph)
    total = len(request.prompts) * request.num_images
    batches = -(-total // (request.batch_size or total))
    with tqdm(
        total=batches * request.steps, desc="sampling", unit="step", file=sys.stderr, disable=not request.progress
    ) as bar:
        result = generate(model, backend, request.prompts, request.num_images, settings, on_step=bar.update)

    common = {
        "steps": request.steps,
        "guidance": result.guidance,
        "seed": request.seed,
        "sampler": f"dpmsolver++ order {sampler.order}, {sampler.spacing}{', karras' if sampler.karras_sigmas else ''}",
        "model_sha256": model.sha256,
        "backend": backend.name,
        "step_impl": result.step_impl,
        "software": f"glyph-engine {__version__}",
    }
    try:
        return _write_outputs(request, result, common)
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

    from glyph_engine import cpp_ext

    try:
        import onnxruntime

        ort = f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"
    except ImportError:
        ort = "not installed (pip install 'glyph-engine[onnx]')"
    trt = load_tensorrt()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return [
        ("glyph-engine", __version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (GPU: {gpu})"),
        ("onnxruntime", ort),
        ("tensorrt", f"{trt.import_name} {trt.version}" if trt else "not installed"),
        ("sampler step", cpp_ext.status()),
        ("embedded model", str(DEFAULT_CHECKPOINT) if DEFAULT_CHECKPOINT.is_file() else "not installed"),
    ]


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
        ("tokenizer", f"vocab {len(model.tokenizer)}, max length {model.max_text_length}"),
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
        *[(k, v) for k, v in model.metadata.items()],
    ]


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
    out = request.out or default_export_dir(request.ckpt)
    if not request.ckpt.exists():
        raise GlyphEngineError(f"checkpoint {request.ckpt} does not exist.")
    manifest, reused = export_model(
        source_sha256(request.ckpt, request.text_encoder),
        lambda: load_model(request.ckpt, request.text_encoder),
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


def run_train(
    data: Path,
    workdir: Path,
    steps: int | None,
    minutes: float | None,
    sample_every: int,
    save_every: int,
    progress: bool,
    init: Path | None = None,
) -> list[str]:
    """Trains (or resumes, or goes on from `init`), then writes WORKDIR/glyffuser.pt and its model card."""
    import json
    import shlex

    from glyph_engine.train import finish, train

    if steps is None and minutes is None:
        raise GlyphEngineError("give --steps and/or --minutes: how long to train in this run.")
    for name, value in (("--steps", steps), ("--minutes", minutes), ("--sample-every", sample_every)):
        if value is not None and value <= 0:
            raise GlyphEngineError(f"{name} must be positive (got {value}).")
    state = train(data, workdir, None, steps, minutes, save_every, sample_every, progress, init=init)
    glyph_count = state.dataset_size
    card = {
        "command": "glyph-engine " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "train",
        "data": f"{data.name}: {glyph_count} glyphs",
        "steps": state.step,
        "epochs": round(state.step * state.config.batch_size / glyph_count, 2),
        "train_hours": round(state.seconds / 3600, 2),
        "final_loss": round(state.losses[-1], 4) if state.losses else None,
        "config": state.config.to_json(),
    }
    out = workdir / "glyffuser.pt"
    digest = finish(state, out, str(out), card)
    (workdir / "MODEL_CARD.json").write_text(json.dumps({**card, "sha256": digest}, indent=2))
    return [
        f"step {state.step} ({card['epochs']} epochs, {card['train_hours']} h), loss {card['final_loss']}",
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)",
    ]


def run_eval(data: Path, ckpt: Path | None, num_samples: int, steps: int, guidance: float | None) -> str:
    from glyph_engine.dataset import load_glyph_set
    from glyph_engine.evaluate import caption_gain, radical_hit_rates, table

    if num_samples < 1 or steps < 1:
        raise GlyphEngineError("-n and --steps must be at least 1.")
    glyphs = load_glyph_set(data)
    model = load_model(ckpt or DEFAULT_CHECKPOINT)
    backend = create_backend("auto", model, default_export_dir(ckpt or DEFAULT_CHECKPOINT))
    settings = GenerationSettings(steps=steps, guidance=guidance)
    rates = table(radical_hit_rates(model, backend, glyphs, num_samples, settings))
    return f"{rates}\n\n{caption_gain(model, backend, glyphs)}"


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise GlyphEngineError(f"{option} takes comma-separated whole numbers, e.g. 1,2,5 (got {text!r}).") from None
    if not values or min(values) < 1:
        raise GlyphEngineError(f"{option} needs numbers of 1 or more (got {text!r}).")
    return values


def run_bench(
    ckpt: Path | None,
    backends: str | None,
    batch: str,
    steps: str,
    out: Path,
    repeats: int,
    report: Callable[[str], None],
) -> list[str]:
    """Measures and writes results.json, .csv, .md and throughput.png into `out`."""
    from glyph_engine.benchmark import BenchConfig, run_benchmark, write_results

    config = BenchConfig(
        batch_sizes=_int_list(batch, "--batch"), steps=_int_list(steps, "--steps"), repeats=max(1, repeats)
    )
    ckpt = ckpt or DEFAULT_CHECKPOINT
    model = load_model(ckpt)
    export_dir = default_export_dir(ckpt)
    names = [n.strip() for n in backends.split(",")] if backends else ["torch", "onnxruntime", "tensorrt"]
    chosen = {}
    for name in names:
        try:
            chosen[name] = create_backend(name, model, export_dir)
        except GlyphEngineError as e:
            if backends:  # asked for by name: a reason to stop
                raise
            report(f"{name}: skipped ({e})")
    results = run_benchmark(model, chosen, config, report)
    paths = write_results(results, out)
    return [f"wrote {p}" for p in paths]
