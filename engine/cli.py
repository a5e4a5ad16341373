"""The `glyph-engine` command line: argument parsing only; the work lives in the library."""

# No `from __future__ import annotations` here, unlike the rest of the package: typer reads every
# command's annotations on each start, and as strings it evaluates them one by one (25 ms of
# every command; 1.5 ms more to import this module instead).
import atexit
import gc
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from glyph_engine import __version__
from glyph_engine.errors import GlyphEngineError
from glyph_engine.samplers import SAMPLERS, SamplerName
from glyph_engine.schedule import SamplerConfig, Spacing
from glyph_engine.settings import DEFAULT_STEPS, BackendName, GenerationSettings, Precision, StepImpl
from glyph_engine.training.distill_config import DistillConfig

app = typer.Typer(
    name="glyph-engine",
    help="Fast inference for glyffuser-style text-to-glyph diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain click output: parse errors end in one "Error: ..." line instead of a box.
    rich_markup_mode=None,
)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turns GlyphEngineError into one line on stderr and exit code 2, never a traceback."""
    try:
        yield
    except GlyphEngineError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


class WorkDone(SystemExit):
    """Raised by a command whose work is done and whose files are closed (`generate`): `main`
    then ends the process without the interpreter's teardown (`_end_now`). Elsewhere (tests'
    CliRunner) it is a plain successful exit."""


@contextmanager
def importing() -> Iterator[None]:
    """A command's own imports, with the garbage collector off. Importing torch and OpenVINO
    creates about a million objects that live as long as the process; the collections they
    trigger find nothing to free and took 0.2 s of a 2.4 s warm `generate` (README,
    "Start-up"). What was imported is then frozen, never examined again, and collection
    resumes for the command's own work (serve and train run for hours)."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _quiet_libraries() -> None:
    """Loading prints progress bars and advice from transformers/diffusers; ours suffice.

    Through their environment variables, read when they are imported: importing them here
    would cost seconds of a warm start that never needs them. A user's own setting wins.
    """
    for name, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ):
        os.environ.setdefault(name, value)


@app.callback()
def _setup(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail to stderr.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr
    )


# Options several commands share, each defined once.
CkptOption = Annotated[
    Optional[Path],
    typer.Option(
        help="glyph-engine checkpoint (.pt), glyffuser diffusers folder or embedded model's name (`glyph-engine "
        "info` lists them) [default: the embedded default model]."
    ),
]
TextEncoderOption = Annotated[
    Optional[str], typer.Option(help="T5 hub id or folder, for diffusers folders [default: google-t5/t5-small].")
]
ExportDirOption = Annotated[
    Optional[Path], typer.Option(help="ONNX export folder [default: beside the checkpoint, NAME-export/].")
]
GuidanceIntervalOption = Annotated[
    Optional[tuple[float, float]],
    typer.Option(
        metavar="LOW HIGH",
        help="Guide only the steps whose noise level sigma is in (LOW, HIGH] (e.g. 0.5 20); the other "
        "steps run half the U-Net batch. Default: the checkpoint's; 0 inf guides every step.",
    ),
]

PrecisionOption = Annotated[
    Precision,
    typer.Option(
        help="U-Net precision; a backend refuses one it cannot run. auto on a CPU: int8 where an int8 build "
        "of the model passed the quality gate here, else bf16 where the CPU has BF16 units (AVX-512 BF16 or "
        "AMX), else fp32; on a GPU: fp16."
    ),
]
CacheDirOption = Annotated[
    Optional[Path],
    typer.Option(
        help="Where models compiled for this CPU are kept between runs [default: $GLYPH_ENGINE_CACHE, else "
        "$XDG_CACHE_HOME/glyph-engine, else ~/.cache/glyph-engine]."
    ),
]

# Defaults come from the library's own settings types, so they are stated once.
_SETTINGS = GenerationSettings()
_SAMPLER = SamplerConfig()

_DEFAULT_SAMPLER = SamplerName(_SAMPLER.name)
SamplerOption = Annotated[
    SamplerName,
    typer.Option(
        help="Sampler: "
        + "; ".join(f"{s.name}: {s.title}, as diffusers' {s.diffusers}" for s in SAMPLERS.values())
        + "."
    ),
]
OrderOption = Annotated[
    Optional[int],
    typer.Option(
        help="Lower the solver order (1 is DDIM-like) [default: a distilled student's recorded order (the "
        "embedded default's 2), else the sampler's own]."
    ),
]
StepsOption = Annotated[
    Optional[int],
    typer.Option(
        help="Sampler steps [default: the checkpoint's: the embedded default's 8, glyffuser-small's 14; "
        f"{DEFAULT_STEPS} for a glyffuser, where 10 is usable]."
    ),
]


@app.command()
def generate(
    prompts: Annotated[
        Optional[list[str]], typer.Argument(help='English definitions to draw, e.g. "metal" (or --prompts-file).')
    ] = None,
    num_images: Annotated[int, typer.Option("-n", "--num-images", help="Glyphs per prompt (1-4096).")] = 16,
    steps: StepsOption = _SETTINGS.steps,
    guidance: Annotated[
        Optional[float],
        typer.Option(help="Classifier-free guidance scale, 0 to 100; 1 turns it off. Default: the checkpoint's."),
    ] = _SETTINGS.guidance,
    guidance_interval: GuidanceIntervalOption = _SETTINGS.guidance_interval,
    seed: Annotated[
        int, typer.Option(help="Seed (0 or more); image i's noise depends only on (seed, i).")
    ] = _SETTINGS.seed,
    ckpt: CkptOption = None,
    text_encoder: TextEncoderOption = None,
    backend: Annotated[BackendName, typer.Option(help="Inference backend; auto picks the fastest here.")] = (
        BackendName.auto
    ),
    export_dir: ExportDirOption = None,
    precision: PrecisionOption = Precision.auto,
    cache_dir: CacheDirOption = None,
    batch_size: Annotated[
        Optional[int], typer.Option(help="Images per U-Net call (x2 with guidance). Default: all at once.")
    ] = _SETTINGS.batch_size,
    out: Annotated[Path, typer.Option("--out", "-o", help="Grid PNG to write.")] = Path("glyphs.png"),
    out_dir: Annotated[Optional[Path], typer.Option(help="Also write each glyph as a PNG in this folder.")] = None,
    sampler: SamplerOption = _DEFAULT_SAMPLER,
    order: OrderOption = _SAMPLER.order,
    spacing: Annotated[Spacing, typer.Option(help="How timesteps are spread.")] = _SAMPLER.spacing,
    karras: Annotated[bool, typer.Option(help="Karras sigmas (more steps at low noise).")] = _SAMPLER.karras_sigmas,
    cuda_graph: Annotated[
        Optional[bool],
        typer.Option(
            "--cuda-graph/--no-cuda-graph",
            help="On a GPU, replay each batch shape from a CUDA graph [default: on for torch, off for tensorrt].",
        ),
    ] = None,
    step_impl: Annotated[
        StepImpl,
        typer.Option(help="Sampler step: fused C++/CUDA op, or eager torch; auto: fused where the op is built."),
    ] = _SETTINGS.step_impl,
    clamp_x0: Annotated[
        Optional[bool],
        typer.Option(
            "--clamp-x0/--no-clamp-x0", help="Clamp each step's x0 to the pixel range [default: the checkpoint's]."
        ),
    ] = _SETTINGS.clamp_x0,
    center_noise: Annotated[
        Optional[bool],
        typer.Option(
            "--center-noise/--no-center-noise",
            help="Remove each image's mean from its initial noise [default: the checkpoint's].",
        ),
    ] = _SETTINGS.center_noise,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    prompts_file: Annotated[
        Optional[Path],
        typer.Option(
            help="Bulk job: one prompt per line; writes -n PNGs per prompt and manifest.jsonl into --out-dir, "
            "and resumes where a previous run of the same job stopped."
        ),
    ] = None,
    ray: Annotated[
        Optional[str],
        typer.Option(
            metavar="ADDRESS",
            help="Spread a --prompts-file job over Ray workers: 'local' starts Ray here, 'auto' joins this "
            "machine's cluster, HOST:PORT joins that cluster.",
        ),
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option(help="Ray workers, each holding the model once [default: one per node].")
    ] = None,
    worker_gpus: Annotated[float, typer.Option(help="GPUs per Ray worker.")] = 0.0,
    chunk_size: Annotated[
        Optional[int],
        typer.Option(
            help="Glyphs per bulk task: larger shares more U-Net calls, smaller loses less to a crash [default: 64]."
        ),
    ] = None,
) -> None:
    """Draw glyphs for one or more prompts and write them as a PNG grid (and single PNGs).

    With --prompts-file, a bulk job: one PNG per glyph and a manifest in --out-dir, in this
    process or on a Ray cluster (--ray).
    """
    with user_errors():
        with importing():
            from glyph_engine.commands import GenerateRequest, run_generate
            from glyph_engine.session import ModelSource

        settings = GenerationSettings(
            steps=steps,
            guidance=guidance,
            guidance_interval=guidance_interval,
            center_noise=center_noise,
            seed=seed,
            batch_size=batch_size,
            sampler=SamplerConfig(name=sampler.value, order=order, spacing=spacing, karras_sigmas=karras),
            clamp_x0=clamp_x0,
            step_impl=step_impl,
        )
        source = ModelSource(
            ckpt=ckpt,
            text_encoder=text_encoder,
            backend=backend,
            export_dir=export_dir,
            cuda_graph=cuda_graph,
            precision=precision,
            cache_dir=cache_dir,
        )
        if prompts_file is not None or ray is not None or workers is not None or chunk_size is not None:
            with importing():
                from glyph_engine.bulk import BulkJob, run_bulk

            if prompts_file is None or out_dir is None or prompts:
                raise GlyphEngineError(
                    "a bulk job takes --prompts-file and --out-dir, and no prompts on the command line "
                    "(--ray, --workers and --chunk-size apply to bulk jobs only)."
                )
            _quiet_libraries()
            job = BulkJob(
                prompts_file=prompts_file,
                out_dir=out_dir,
                num_images=num_images,
                settings=settings,
                source=source,
                ray_address=ray,
                workers=workers,
                worker_gpus=worker_gpus,
                chunk_images=BulkJob.chunk_images if chunk_size is None else chunk_size,
                progress=not quiet and sys.stderr.isatty(),
            )
            for line in run_bulk(job):
                typer.echo(line, err=True)
            return
        if not prompts:
            raise GlyphEngineError('give one or more prompts, e.g. glyph-engine generate "metal", or --prompts-file.')
        request = GenerateRequest(
            prompts=prompts,
            num_images=num_images,
            settings=settings,
            source=source,
            out=out,
            out_dir=out_dir,
            progress=not quiet and sys.stderr.isatty(),
        )
        _quiet_libraries()
        written = run_generate(request)
        if not quiet:
            for path in written:
                typer.echo(f"wrote {path}", err=True)
        raise WorkDone(0)


@app.command()
def info(
    ckpt: Annotated[
        Optional[Path], typer.Argument(help="glyph-engine checkpoint (.pt) or glyffuser diffusers folder.")
    ] = None,
    text_encoder: TextEncoderOption = None,
) -> None:
    """Print this machine's backends and sampler step, and what a checkpoint holds."""
    with user_errors():
        with importing():
            from glyph_engine.checkpoint import load_model
            from glyph_engine.commands import describe, environment

        _quiet_libraries()
        rows = environment()
        if ckpt is not None:
            rows += describe(load_model(ckpt, text_encoder))
        for key, value in rows:
            typer.echo(f"{key:<18} {value}")


@app.command()
def convert(
    folder: Annotated[Path, typer.Argument(help="glyffuser diffusers folder (model_index.json, unet/, scheduler/).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint file to write.")] = Path("ckpt.pt"),
    text_encoder: Annotated[str, typer.Option(help="T5 hub id or local folder.")] = "google-t5/t5-small",
    default_guidance: Annotated[
        float, typer.Option(help="Guidance `generate` uses by default; 1 for models trained without CFG.")
    ] = 1.0,
    fp16: Annotated[bool, typer.Option(help="Store weights in FP16 (half the size).")] = False,
) -> None:
    """Pack a glyffuser diffusers folder and its T5 encoder into one offline checkpoint."""
    with user_errors():
        import torch

        from glyph_engine.checkpoint import convert_diffusers_folder

        _quiet_libraries()
        digest = convert_diffusers_folder(
            folder, out, text_encoder, default_guidance, dtype=torch.float16 if fp16 else None
        )
        typer.echo(f"wrote {out} (sha256 {digest[:16]})")


@app.command("export")
def export_(
    ckpt: Annotated[
        Path,
        typer.Argument(
            help="glyph-engine checkpoint (.pt), glyffuser diffusers folder or embedded model's name "
            "(`glyph-engine info` lists them)."
        ),
    ],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Export folder [default: beside the checkpoint, NAME-export/]."),
    ] = None,
    text_encoder: TextEncoderOption = None,
    precision: Annotated[str, typer.Option(help="Comma-separated precisions to export: fp32, fp16.")] = "fp32,fp16",
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    max_batch: Annotated[int, typer.Option(help="Largest image batch the exported shapes cover.")] = 64,
    force: Annotated[bool, typer.Option(help="Rebuild even if an up-to-date export exists.")] = False,
    tensorrt: Annotated[
        Optional[bool],
        typer.Option(
            "--tensorrt/--no-tensorrt",
            help="Also build TensorRT FP16 engines [default: when TensorRT is installed and a GPU is present].",
        ),
    ] = None,
    compute_capability: Annotated[
        Optional[str],
        typer.Option(help="Build engines ahead of time for this GPU, e.g. 8.6 (TensorRT-RTX; no GPU needed)."),
    ] = None,
    static_batch: Annotated[
        Optional[int], typer.Option(help="Fix the U-Net engine to this many images (for CUDA graphs).")
    ] = None,
) -> None:
    """Export the U-Net and T5 encoder to ONNX (FP32 and FP16), checked against PyTorch,
    and build TensorRT FP16 engines from them.

    Re-running with the same checkpoint and options reuses the folder without work.
    """
    with user_errors():
        with importing():
            from glyph_engine.export.command import ExportRequest, run_export

        _quiet_libraries()
        request = ExportRequest(
            ckpt=ckpt,
            out=out,
            text_encoder=text_encoder,
            precisions=tuple(p.strip() for p in precision.split(",") if p.strip()),
            opset=opset,
            max_batch=max_batch,
            force=force,
            tensorrt=tensorrt,
            compute_capability=compute_capability,
            static_batch=static_batch,
        )
        for line in run_export(request, report=lambda message: typer.echo(message, err=True)):
            typer.echo(line)


@app.command()
def dataset(
    out: Annotated[Path, typer.Option("--out", "-o", help="The .npz file to write.")] = Path("glyphs.npz"),
    resolution: Annotated[int, typer.Option(help="Glyph size in pixels (the original: 128).")] = 32,
    font: Annotated[
        Optional[Path], typer.Option(help="CJK font file [default: Noto Sans CJK SC from Debian's fonts-noto-cjk].")
    ] = None,
    unihan: Annotated[Path, typer.Option(help="Folder with Unihan_*.txt.bz2 (Debian's unicode-data).")] = Path(
        "/usr/share/unicode"
    ),
    limit: Annotated[Optional[int], typer.Option(help="Keep only the first N characters (for quick tests).")] = None,
) -> None:
    """Build the training set: Unihan definitions, rendered glyphs and radicals, in one .npz."""
    with user_errors():
        with importing():
            from glyph_engine.files import check_writable_file
            from glyph_engine.training.dataset import build_glyph_set, save_glyph_set

        check_writable_file(out)
        glyphs = build_glyph_set(resolution, font, unihan, limit)
        save_glyph_set(glyphs, out)
        typer.echo(
            f"wrote {out}: {len(glyphs)} glyphs of {resolution}x{resolution}, {len(set(glyphs.radicals))} radicals"
        )


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Dataset from `glyph-engine dataset`.")] = Path("glyphs.npz"),
    workdir: Annotated[Path, typer.Option(help="Training state, samples and the final checkpoint.")] = Path("run"),
    steps: Annotated[Optional[int], typer.Option(help="Train until this many steps in total.")] = None,
    minutes: Annotated[Optional[float], typer.Option(help="Stop after this many minutes (resume later).")] = None,
    sample_every: Annotated[int, typer.Option(help="Write a sample grid every N steps.")] = 1000,
    save_every: Annotated[int, typer.Option(help="Save the resumable state every N steps.")] = 200,
    init: Annotated[
        Optional[Path],
        typer.Option(
            help="Start a new WORKDIR from this checkpoint of `glyph-engine train` (e.g. the embedded model, "
            "see `glyph-engine info`) instead of from scratch."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a small glyffuser from scratch (resumes from WORKDIR); writes WORKDIR/glyffuser.pt."""
    with user_errors():
        with importing():
            from glyph_engine.training.commands import run_train

        _quiet_libraries()
        for line in run_train(
            data, workdir, steps, minutes, sample_every, save_every, not quiet and sys.stderr.isatty(), init
        ):
            typer.echo(line)


_DISTILL = DistillConfig()


@app.command()
def distill(
    teacher: Annotated[
        Path, typer.Argument(help="The teacher: a glyph-engine checkpoint or a glyffuser diffusers folder.")
    ],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="The student, written once every stage is done (card: OUT.card.json).")
    ] = Path("student.pt"),
    data: Annotated[Path, typer.Option(help="Dataset from `glyph-engine dataset` (the teacher's size).")] = Path(
        "glyphs.npz"
    ),
    workdir: Annotated[Path, typer.Option(help="Resumable state and each finished stage's student.")] = Path("distill"),
    steps: Annotated[Optional[int], typer.Option(help="Stop at this many steps over all stages.")] = None,
    minutes: Annotated[Optional[float], typer.Option(help="Stop after this many minutes (resume later).")] = None,
    save_every: Annotated[int, typer.Option(help="Save the resumable state every N steps.")] = 100,
    final_steps: Annotated[
        Optional[int], typer.Option(help=f"Steps the student samples in [default: {_DISTILL.final_steps}].")
    ] = None,
    start_steps: Annotated[
        Optional[int],
        typer.Option(
            help="Single-step DPM-Solver++(2S) steps of the guided teacher that the first halving learns "
            f"two at a time [default: {_DISTILL.start_steps}]."
        ),
    ] = None,
    guidance_steps: Annotated[
        Optional[int],
        typer.Option(
            help=f"Steps of guidance distillation alone, before the halvings [default: {_DISTILL.guidance_steps}]."
        ),
    ] = None,
    stage_steps: Annotated[
        Optional[int], typer.Option(help=f"Steps of each halving [default: {_DISTILL.stage_steps}].")
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Images per step [default: {_DISTILL.batch_size}].")] = (
        None
    ),
    step_weighting: Annotated[
        Optional[str],
        typer.Option(
            help="How a halving weighs its student's steps: balanced (each step's loss over its own running mean) "
            f"or snr (max(SNR, 1), Salimans & Ho) [default: {_DISTILL.step_weighting}]."
        ),
    ] = None,
    x0_loss: Annotated[
        Optional[str],
        typer.Option(
            help="What a halving's loss compares: clamped (the student's x0 clamped to the pixel range where "
            f"the target lies on its bound, as the sampler clamps it) or mse (unclamped) [default: {_DISTILL.x0_loss}]."
        ),
    ] = None,
    rollout_share: Annotated[
        Optional[float],
        typer.Option(
            help="Share of each halving batch whose input is where the student's own steps stand, from "
            f"generation's noise, rather than a noised dataset image [default: {_DISTILL.rollout_share}]."
        ),
    ] = None,
    lr_schedule: Annotated[
        Optional[str],
        typer.Option(
            help="The learning rate after each stage's warm-up: constant, or cosine (falling to 0 at the "
            f"stage's last step) [default: {_DISTILL.lr_schedule}]."
        ),
    ] = None,
    text_encoder: TextEncoderOption = None,
    snapshot: Annotated[
        Optional[Path],
        typer.Option(
            help="Train nothing: write the averaged weights of WORKDIR's stage in progress to this file, "
            "a student to gate with `eval --against` (safe while a run goes on)."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Distil TEACHER into a few-step student with guidance built in (one U-Net pass per step).

    Progressive distillation halving the steps, the first halving from the guided teacher
    itself (the student learns the guidance scale as an input); resumes from WORKDIR. Without
    the settings options, a resumed WORKDIR keeps its own.
    """
    with user_errors():
        with importing():
            from glyph_engine.training.commands import run_distill, run_snapshot

        _quiet_libraries()
        if snapshot is not None:
            for line in run_snapshot(teacher, workdir, snapshot, text_encoder):
                typer.echo(line)
            return
        given = {
            "final_steps": final_steps,
            "start_steps": start_steps,
            "guidance_steps": guidance_steps,
            "stage_steps": stage_steps,
            "batch_size": batch_size,
            "step_weighting": step_weighting,
            "x0_loss": x0_loss,
            "rollout_share": rollout_share,
            "lr_schedule": lr_schedule,
        }
        changes = {k: v for k, v in given.items() if v is not None}
        config = replace(_DISTILL, **changes) if changes else None
        progress = not quiet and sys.stderr.isatty()
        for line in run_distill(
            teacher, out, data, workdir, steps, minutes, save_every, progress, config, text_encoder
        ):
            typer.echo(line)


@app.command("eval")
def eval_(
    data: Annotated[Path, typer.Option(help="Dataset from `glyph-engine dataset` (same resolution).")] = Path(
        "glyphs.npz"
    ),
    ckpt: CkptOption = None,
    num_samples: Annotated[int, typer.Option("-n", help="Glyphs per prompt.")] = 64,
    steps: StepsOption = _SETTINGS.steps,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance [default: the checkpoint's].")] = None,
    guidance_interval: GuidanceIntervalOption = None,
    sampler: SamplerOption = _DEFAULT_SAMPLER,
    order: OrderOption = _SAMPLER.order,
    backend: Annotated[BackendName, typer.Option(help="Inference backend; auto picks the fastest here.")] = (
        BackendName.auto
    ),
    precision: PrecisionOption = Precision.auto,
    cache_dir: CacheDirOption = None,
    against: Annotated[
        Optional[Path],
        typer.Option(
            metavar="TEACHER",
            help="Gate a distilled student (--ckpt) against its teacher, evaluated at the teacher's defaults "
            "but at 20 steps (where it records fewer, they were gated against 20); exits 1 if the student fails.",
        ),
    ] = None,
) -> None:
    """Radical hit rate: how often "metal" draws glyphs whose nearest training glyph has 金.

    Also the share of broken samples (a grey page or speckle instead of ink on white); with
    --backend/--precision, the quality of each inference path can be compared. With --against,
    the quality gate of a student: every lift within 20% of the teacher's or higher, at least
    as many prompts at 5x, broken share at most 1 point above, nearest-neighbour distance not
    lower.
    """
    with user_errors():
        with importing():
            from glyph_engine.session import ModelSource
            from glyph_engine.training.commands import run_eval

        _quiet_libraries()
        settings = GenerationSettings(
            steps=steps,
            guidance=guidance,
            guidance_interval=guidance_interval,
            sampler=SamplerConfig(name=sampler.value, order=order),
        )
        source = ModelSource(ckpt=ckpt, backend=backend, precision=precision, cache_dir=cache_dir)
        teacher = None if against is None else replace(source, ckpt=against)
        evaluation = run_eval(data, source, num_samples, settings, teacher)
        typer.echo(evaluation.report)
        if not evaluation.passed:
            raise typer.Exit(1)


@app.command()
def bench(
    ckpt: Annotated[
        Optional[str],
        typer.Option(
            help="Comma-separated checkpoints (.pt) or glyffuser diffusers folders measured side by side, e.g. "
            "teacher.pt,student.pt; the peer runs the first teacher [default: the embedded default model and its "
            "teacher]."
        ),
    ] = None,
    text_encoder: TextEncoderOption = None,
    export_dir: ExportDirOption = None,
    backends: Annotated[
        Optional[str],
        typer.Option(
            help="Comma-separated backends [default: every one that runs here but inductor, whose first use "
            "compiles for minutes: name it to measure it]."
        ),
    ] = None,
    batch: Annotated[str, typer.Option(help="Comma-separated image batch sizes.")] = "16",
    steps: Annotated[str, typer.Option(help="Comma-separated step counts.")] = "1,2,5,10,20,50",
    sampler: Annotated[
        Optional[str],
        typer.Option(help=f"Comma-separated samplers to compare ({', '.join(SAMPLERS)}) [default: {_SAMPLER.name}]."),
    ] = None,
    guidance: Annotated[
        Optional[float],
        typer.Option(
            help="Guidance scale of the peer and every model; a student takes it as its input "
            "[default: 1, unguided, as the published loop]."
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the results.")] = Path("bench-results"),
    repeats: Annotated[int, typer.Option(help="Timed runs per point (the median is kept).")] = 3,
    precision: PrecisionOption = Precision.auto,
    cache_dir: CacheDirOption = None,
    fixed_cost: Annotated[
        bool,
        typer.Option(
            help="Also time whole `generate -n 1 --steps 1` processes (warm and cold cache) against importing "
            "torch, OpenVINO and numpy: the fixed cost per run, apart from the cost per image."
        ),
    ] = True,
) -> None:
    """Measure images/s against steps for each model and backend and the glyffuser's own loop.

    Writes results.json, results.csv, results.md and throughput.png (log-log, one line per
    model and backend: a teacher's and a student's curves side by side) with a description
    of the machine, and the fixed cost of a process (imports, loading, compiling).
    """
    with user_errors():
        with importing():
            from glyph_engine.commands import run_bench
            from glyph_engine.session import ModelSource

        _quiet_libraries()
        report = lambda m: typer.echo(m, err=True)  # noqa: E731
        source = ModelSource(text_encoder=text_encoder, export_dir=export_dir, precision=precision, cache_dir=cache_dir)
        for line in run_bench(
            source, ckpt, backends, batch, steps, sampler, guidance, out, repeats, report, fixed_cost
        ):
            typer.echo(line)


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on; anything but loopback needs --token or --insecure.")
    ] = ("127.0.0.1"),
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    address: Annotated[
        Optional[str],
        typer.Option(help="Join this Ray cluster (e.g. 10.0.0.5:6379, or auto) [default: start a local Ray]."),
    ] = None,
    replicas: Annotated[int, typer.Option(help="Model replicas (each holds the model once).")] = 1,
    max_replicas: Annotated[
        Optional[int], typer.Option(help="Autoscale between --replicas and this many replicas with the load.")
    ] = None,
    num_gpus: Annotated[float, typer.Option(help="GPUs per replica (fractions share a GPU).")] = 0.0,
    num_cpus: Annotated[
        Optional[float], typer.Option(help="CPU cores per replica [default: this machine's cores / --replicas].")
    ] = None,
    max_batch_size: Annotated[
        int, typer.Option(help="Images per shared sampling run (x2 rows with guidance); 1 turns batching off.")
    ] = 32,
    batch_wait_ms: Annotated[
        float, typer.Option(help="How long a run waits for more requests to join once one arrived.")
    ] = 10.0,
    max_queue: Annotated[
        int, typer.Option(help="Images a replica lets wait; beyond, requests get 503 with Retry-After.")
    ] = 512,
    ckpt: CkptOption = None,
    text_encoder: TextEncoderOption = None,
    backend: Annotated[BackendName, typer.Option(help="Inference backend; auto picks the fastest here.")] = (
        BackendName.auto
    ),
    precision: PrecisionOption = Precision.auto,
    cache_dir: CacheDirOption = None,
    token: Annotated[
        Optional[str],
        typer.Option(
            envvar="GLYPH_ENGINE_TOKEN",
            help="Require 'Authorization: Bearer TOKEN' on requests (prefer the variable: an option shows in ps).",
        ),
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow a non-loopback --host without a token.")] = False,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port of the local Ray.")] = 8080,
    sampler: SamplerOption = _DEFAULT_SAMPLER,
    order: OrderOption = _SAMPLER.order,
) -> None:
    """Serve the model over HTTP on Ray Serve: POST /generate, GET /healthz, /docs.

    Concurrent requests share U-Net calls. Stops on Ctrl-C or SIGTERM after finishing the
    requests in flight.
    """
    with user_errors():
        with importing():
            from glyph_engine.serve.batcher import BatchConfig
            from glyph_engine.serve.server import ServeOptions, run_serve
            from glyph_engine.session import ModelSource

        _quiet_libraries()
        options = ServeOptions(
            source=ModelSource(
                ckpt=ckpt, text_encoder=text_encoder, backend=backend, precision=precision, cache_dir=cache_dir
            ),
            batch=BatchConfig(
                max_batch_images=max_batch_size, wait_s=batch_wait_ms / 1000, max_queued_images=max_queue
            ),
            host=host,
            port=port,
            address=address,
            replicas=replicas,
            max_replicas=max_replicas,
            num_gpus=num_gpus,
            num_cpus=num_cpus,
            token=token,
            insecure=insecure,
            metrics_port=metrics_port,
            settings=GenerationSettings(sampler=SamplerConfig(name=sampler.value, order=order)),
        )
        run_serve(options, report=lambda message: typer.echo(message, err=True))


@app.command()
def version() -> None:
    """Print glyph-engine's version."""
    typer.echo(__version__)


def main() -> None:
    try:
        app()
    except WorkDone:
        _end_now()
    finally:
        # The interpreter's last garbage collection at exit walks every object torch created:
        # 0.3-0.4 s of a 2 s warm `generate` (README, "Start-up"). Frozen, they are left to the
        # operating system. Only that collection is skipped: what reference counting frees
        # (files, compiled models and their temporary folders) is freed as before, and exit
        # handlers run.
        gc.freeze()


def _end_now() -> NoReturn:
    """Ends a command whose work is done without the interpreter's teardown, which unloads
    torch's and OpenVINO's modules and libraries one by one: 0.14 s of a 2.8 s warm `generate`,
    for memory the operating system takes back at once (compilers skip it the same way, e.g.
    clang's -disable-free). Exit handlers still run (temporary folders, logging) and output is
    flushed. Not waited for: threads other than daemons, which `generate` does not start."""
    atexit._run_exitfuncs()  # the handlers the interpreter would run at exit (CPython's own hook)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
