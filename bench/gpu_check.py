"""`make gpu-check`: everything GPU-side in one pass, results in one folder.

    python bench/gpu_check.py [--out gpu-results] [--skip-suite] [--quick]

Sections, in order; each reports in one JSON object (or Markdown) in --out, at most 8 files,
written after every section so that a pass cut short keeps what it found:

1. wheels: a GPU machine has no network; what glyph-engine needs there and lacks (diffusers,
   glyph-engine itself, ...) is installed from `wheels/` (`make gpu-wheels`), then this script
   restarts so the new packages are seen. Recorded in environment.json.
2. environment.json: Python, torch and its CUDA, the GPU, its clocks, nvcc, the CPU, libraries.
3. parity.json: the fused op (`glyph_engine.cpp_ext`) built, then checked against the eager
   formula (`sampler.dpmpp_step`) through the pipeline's own adapter (`step.fused_dpmpp_step`):
   every flag combination (guided, second order, clamped) x FP32/FP16, odd element counts,
   misaligned views (`x[1:]`); on CUDA also a non-default stream and 2^31+3 FP16 elements.
4. pytest.md: `pytest -m gpu`.
5. generate.json: `generate` on CUDA with the fused and the eager step: images agree, and the
   op is seen dispatched once per step.
6. bench-gpu.json, bench-gpu.md: the peer (the glyffuser's own loop), glyph-engine eager and
   glyph-engine fastest on the full-size glyffuser and the embedded model (docs/ keeps a copy).
7. pytest.md again: the whole suite (unless --skip-suite), last, in what is left of the
   pass's 10 minutes.
8. summary.md: one line per section.

Without a GPU only the CPU side of the parity sweep runs; one line says so, and the exit
status is 0 when that passed. With one, the exit status is 0 when every section passed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

# glyph_engine, diffusers and the tests' factories are imported inside the sections: the
# first step may be what installs them.
if TYPE_CHECKING:
    from glyph_engine.backends.base import Backend
    from glyph_engine.model import Glyffuser
    from glyph_engine.schedule import StepCoefficients

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "wheels"
# Every file this script may write: never more than the 8 the results may hold.
FILES = (
    "environment.json",
    "parity.json",
    "pytest.md",
    "generate.json",
    "bench-gpu.json",
    "bench-gpu.md",
    "summary.md",
)
# Set across the restart after installing: what was installed (and that it was tried once).
INSTALLED_ENV = "GPU_CHECK_INSTALLED"
NO_GPU = (
    "gpu-check: the GPU parts (CUDA parity, pytest -m gpu, the suite on the GPU, generate on CUDA, "
    "the GPU benchmark) need a GPU machine; this one has none."
)
LIBRARIES = (
    *("glyph-engine", "torch", "triton", "diffusers", "transformers", "onnx", "onnxruntime", "openvino"),
    *("numpy", "pillow", "sentencepiece", "ninja", "pytest", "pytest-benchmark"),
)


# --- 1. wheels --------------------------------------------------------------------------------

# What the CUDA path imports beyond the GPU machine's own software; one missing means install.
NEEDED_MODULES = ("glyph_engine", "diffusers", "PIL", "sentencepiece")


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them ("Pillow", "charset_normalizer" -> "charset-normalizer")."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_installed(distribution: str) -> bool:
    try:
        version(distribution)
    except PackageNotFoundError:
        return False
    return True


def install_missing() -> dict[str, Any]:
    """Installs from wheels/ the distributions this Python lacks, and glyph-engine itself
    (editable, offline); then restarts this script, since an editable install is only seen
    by a new interpreter. Returns what was installed (after the restart) or why nothing was."""
    if INSTALLED_ENV in os.environ:
        return json.loads(os.environ.pop(INSTALLED_ENV))  # popped: the pytest runs must not inherit it
    if all(importlib.util.find_spec(m) is not None for m in NEEDED_MODULES):
        return {"installed": [], "note": "nothing missing"}
    if not WHEELS.is_dir():
        return {"installed": [], "note": "modules missing and no wheels/ folder: run `make gpu-wheels` and carry it"}
    # A wheel's file name starts with its distribution's name.
    wheels = sorted(p for p in WHEELS.glob("*.whl") if not is_installed(normalized(p.name.split("-")[0])))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--find-links", str(WHEELS)]
    commands = [[*pip, *map(str, wheels)]] if wheels else []
    installed = [p.name for p in wheels]
    if importlib.util.find_spec("glyph_engine") is None:
        # Built in isolation with setuptools and wheel from wheels/; its dependencies are the
        # wheels above and the machine's own software, so --no-deps.
        commands.append([*pip, "--editable", str(ROOT)])
        installed.append("glyph-engine (editable)")
    if not commands:
        return {"installed": [], "note": "modules missing, but wheels/ has nothing this Python lacks"}
    record: dict[str, Any] = {"installed": installed}
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            record.setdefault("errors", []).append(one_line(result.stderr))
    print(f"gpu-check: installed {', '.join(installed)} from wheels/; restarting", flush=True)
    os.environ[INSTALLED_ENV] = json.dumps(record)
    os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]])


# --- 2. environment ---------------------------------------------------------------------------


def command_output(command: list[str]) -> str | None:
    """What `command` prints; None when the program is not there."""
    if shutil.which(command[0]) is None and not Path(command[0]).is_file():
        return None
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return (result.stdout or result.stderr).strip()


def installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(wheels: dict[str, Any]) -> dict[str, Any]:
    from torch.utils.cpp_extension import CUDA_HOME

    from glyph_engine.cpu import cpu_info

    cuda = torch.cuda.is_available()
    nvcc = shutil.which("nvcc") or (str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else "nvcc")
    cpu = cpu_info()
    clocks = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem"
    return {
        "passed": False if "errors" in wheels else None,  # a record, unless installing failed
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        "gpu_memory_gib": round(torch.cuda.mem_get_info()[1] / 2**30, 1) if cuda else None,
        "nvidia_smi": command_output(["nvidia-smi", f"--query-gpu={clocks}", "--format=csv"]),
        "nvcc": command_output([nvcc, "--version"]),
        "cpu": cpu.model,
        "cpu_cores": cpu.cores,
        "libraries": {name: installed_version(name) for name in LIBRARIES},
        "wheels": wheels,
    }


# --- 3. parity of the fused op against the eager formula ---------------------------------------

FLAGS = list(itertools.product([False, True], repeat=3))  # (guided, second order, clamp)
GUIDANCE = 7.5
CLAMP = (0.0, 1.0)
MAIN = 64 * 128 * 128  # a batch of 64 full-size glyphs
HUGE = 2**31 + 3  # past 32-bit indexing, and odd: the scalar path
CHUNK = 2**26  # elements compared at a time: the FP32 reference of 2^31 elements would need 40 GiB


@dataclass(frozen=True)
class Case:
    device: str
    dtype: torch.dtype
    numel: int
    guided: bool
    second_order: bool
    clamp: bool
    misaligned: bool = False  # x[1:] of a larger tensor: the float4/half2 paths must not be taken
    side_stream: bool = False  # queued on a non-default stream, behind the copy that fills x

    @property
    def name(self) -> str:
        flags = [f for f, on in (("guided", self.guided), ("order2", self.second_order), ("clamp", self.clamp)) if on]
        extra = [f for f, on in (("misaligned", self.misaligned), ("side-stream", self.side_stream)) if on]
        dtype = str(self.dtype).removeprefix("torch.")
        return " ".join([self.device, dtype, f"n={self.numel}", *flags, *extra])


def sweep(device: str, quick: bool) -> list[Case]:
    sizes = (4096, 1, 7, 1023) if quick else (MAIN, 1, 7, 1023, 65537)
    misaligned = (4096,) if quick else (4096, 65537)
    cases = [
        Case(device, dtype, n, *flags, misaligned=shifted)
        for dtype in (torch.float32, torch.float16)
        for flags in FLAGS
        for n, shifted in [*((n, False) for n in sizes), *((n, True) for n in misaligned)]
    ]
    if device == "cuda":
        cases += [
            Case(device, dtype, MAIN, True, True, True, side_stream=True) for dtype in (torch.float32, torch.float16)
        ]
        cases.append(Case(device, torch.float16, HUGE, True, True, True))
    return cases


def coefficients() -> tuple[StepCoefficients, StepCoefficients]:
    """A first-order step (x_scale 157 at the first of 10 steps: a hard case) and a second-order one,
    on the glyffuser's training schedule (diffusers' linear betas, 1e-4 to 0.02 over 1000 steps)."""
    import numpy as np

    from glyph_engine.schedule import dpmpp_coefficients

    steps = dpmpp_coefficients(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)), 10)
    return steps[0], steps[4]


def tolerance(case: Case, coef: StepCoefficients) -> tuple[float, float]:
    """(rtol, atol), as tests/test_cpp_ext.py: FP16 may differ by its final rounding (one ulp,
    2^-10 relative); FP32 on the CPU is built without FMA contraction and matches to rounding;
    on CUDA the GPU contracts to FMA: a few ulps of the largest term, x_scale * x."""
    if case.dtype == torch.float16:
        return 1e-3, 1e-3
    if case.device == "cpu":
        return 1e-6, 1e-6
    return 1e-5, 1e-5 * max(1.0, coef.x_scale)


def inputs(case: Case) -> list[Tensor]:
    """x, eps_cond, eps_uncond, x0_prev: standard normal, made on the case's device (2^31
    elements would take minutes on the host)."""
    gen = torch.Generator(case.device).manual_seed(case.numel)
    shift = 1 if case.misaligned else 0
    return [
        torch.randn(case.numel + shift, generator=gen, device=case.device, dtype=case.dtype)[shift:] for _ in range(4)
    ]


def reference(x: Tensor, ec: Tensor, eu: Tensor | None, xp: Tensor | None, coef, clamp) -> tuple[Tensor, Tensor]:
    """The eager step in FP32 on the same inputs, rounded to their dtype: what the op computes."""
    from glyph_engine.sampler import dpmpp_step

    up = [None if t is None else t.float() for t in (x, ec, eu)]
    history = () if xp is None else (xp.float(),)
    return tuple(t.to(x.dtype) for t in dpmpp_step(*up, history, coef, GUIDANCE, clamp))


def on_side_stream(op: Callable[..., tuple[Tensor, Tensor]], x: Tensor, *rest: Any) -> tuple[Tensor, Tensor]:
    """`op` on a copy of x made on a side stream after tens of milliseconds of GPU work there:
    a kernel queued on any stream but torch's current one would read the copy before it lands."""
    late = torch.zeros_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        late.copy_(x)
        out = op(late, *rest)
    torch.cuda.current_stream().wait_stream(side)
    return out


def fused_step(*args: Any) -> tuple[Tensor, Tensor]:
    """The op as the pipeline calls it (`step.fused_dpmpp_step`: the sampler's step signature)."""
    from glyph_engine.step import fused_dpmpp_step

    return fused_dpmpp_step(*args)


def check_case(case: Case, op: Callable[..., tuple[Tensor, Tensor]] = fused_step) -> dict[str, Any]:
    """Runs `op` on the case's inputs and compares it with the eager reference, chunk by chunk."""
    first, second = coefficients()
    coef = second if case.second_order else first
    x, ec, eu, xp = inputs(case)
    eu = eu if case.guided else None
    xp = xp if case.second_order else None
    clamp = CLAMP if case.clamp else None
    args = (ec, eu, () if xp is None else (xp,), coef, GUIDANCE, clamp)
    ours = on_side_stream(op, x, *args) if case.side_stream else op(x, *args)
    rtol, atol = tolerance(case, coef)
    worst, close = 0.0, all(t.dtype == x.dtype and t.shape == x.shape and t.device == x.device for t in ours)
    for start in range(0, case.numel, CHUNK):
        part = slice(start, start + CHUNK)
        ref = reference(*(None if t is None else t[part] for t in (x, ec, eu, xp)), coef, clamp)
        for got, expected in zip(ours, ref, strict=True):
            expected = expected.float()
            diff = (got[part].float() - expected).abs()
            worst = max(worst, diff.max().item())
            close = close and bool((diff <= atol + rtol * expected.abs()).all())  # NaN fails too
    return {
        "name": case.name,
        **{k: v for k, v in asdict(case).items() if k != "dtype"},
        "dtype": str(case.dtype).removeprefix("torch."),
        "address_mod_16": x.data_ptr() % 16,
        "max_abs_error": worst,
        "rtol": rtol,
        "atol": atol,
        "passed": close,
    }


def memory_problem(case: Case) -> str | None:
    """Why a CUDA case cannot run here: its six tensors and the chunked reference must fit."""
    if case.device != "cuda":
        return None
    needed = 6 * case.numel * case.dtype.itemsize + 16 * CHUNK * 4
    free = torch.cuda.mem_get_info()[0]
    return None if free >= needed else f"needs {needed / 2**30:.1f} GiB of GPU memory, {free / 2**30:.1f} GiB free"


def parity(cuda: bool, quick: bool) -> dict[str, Any]:
    from glyph_engine import cpp_ext

    start = time.perf_counter()
    status = cpp_ext.status()  # builds the op for each device it can (cached by torch afterwards)
    build_seconds = round(time.perf_counter() - start, 1)
    cases, skipped = [], []
    for device in ("cpu", "cuda") if cuda else ("cpu",):
        if status[device] is not None:
            cases.append({"name": f"{device}: the op is built", "passed": False, "error": status[device]})
            continue
        for case in sweep(device, quick):
            problem = memory_problem(case)
            if problem is None:
                cases.append(check_case(case))
            else:
                skipped.append({"name": case.name, "reason": problem})
        if device == "cuda":
            torch.cuda.empty_cache()  # the 2^31 case's blocks, before the pytest runs need the GPU
    failed = [c["name"] for c in cases if not c["passed"]]
    return {
        "passed": not failed,
        "op_status": status,
        "build_seconds": build_seconds,
        "failed": failed,
        "skipped": skipped,
        "cases": cases,
    }


# --- 4. pytest ----------------------------------------------------------------------------------

PYTEST_SECTIONS = ("pytest -m gpu", "pytest (whole suite)")
# The pass's length: about 10 minutes, and within a lent GPU machine's 10-minute limit a command.
PASS_SECONDS = 570


def pytest_run(title: str, args: list[str], timeout: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-q", *args]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as e:
        # On POSIX the output so far comes as bytes, whatever `text` says.
        code, output = None, (e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or "")
        output += f"\ntimed out after {timeout} s"
    lines = output.strip().splitlines()
    return {
        "title": title,
        "command": " ".join(["python", *command[1:]]),
        "exit_code": code,
        "seconds": round(time.perf_counter() - start, 1),
        "summary": lines[-1] if lines else "",
        "tail": lines[-60:],
        "passed": code == 0,
    }


def whole_suite(started: float) -> dict[str, Any]:
    """The whole suite in what is left of the pass's time, so that the pass ends within it."""
    # A test module that imports a CPU-only backend absent here (openvino: too big to travel
    # as a wheel) fails to import; the other modules still run, and the error is reported.
    left = int(PASS_SECONDS - (time.monotonic() - started))
    return pytest_run("the whole suite", ["--continue-on-collection-errors"], timeout=max(60, left))


def pytest_markdown(runs: list[dict[str, Any]]) -> str:
    lines = []
    for run in runs:
        if "error" in run:
            lines += [f"## {run.get('title', 'pytest')}", "", f"did not run: {run['error']}", ""]
            continue
        lines += [f"## {run['title']}", "", f"`{run['command']}`: exit code {run['exit_code']}, {run['seconds']} s", ""]
        lines += ["```", *run["tail"], "```", ""]
    return "\n".join(lines)


# --- 5. generate on CUDA ------------------------------------------------------------------------

OP = "glyph_engine::dpmpp_step"
GENERATE_STEPS = 20
GENERATE_TOLERANCE = 2e-2  # pixels in [0, 1]; FP16 U-Net: one ulp of its input moves the path a little


def op_dispatches(run: Callable[[], object]) -> int:
    """How many times `run()` dispatched the fused op (torch's profiler sees every op call)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(event.count for event in prof.key_averages() if event.key == OP)


def generate_on_cuda() -> dict[str, Any]:
    from glyph_engine.backends.pytorch import TorchBackend
    from glyph_engine.checkpoint import load_model
    from glyph_engine.model import DEFAULT_CHECKPOINT
    from glyph_engine.pipeline import Generation, generate
    from glyph_engine.settings import GenerationSettings, StepImpl

    model = load_model(DEFAULT_CHECKPOINT)
    backend = TorchBackend(model, device="cuda")

    def generate_with(impl: StepImpl) -> tuple[Generation, int]:
        settings = GenerationSettings(steps=GENERATE_STEPS, step_impl=impl)
        out = {}
        calls = op_dispatches(lambda: out.setdefault("run", generate(model, backend, ["metal", "water"], 4, settings)))
        return out["run"], calls

    (fused, fused_calls), (eager, eager_calls) = generate_with(StepImpl.fused), generate_with(StepImpl.torch)
    dispatches = {"fused": fused_calls, "torch": eager_calls}
    diff = (fused.images - eager.images).abs()
    # One batch (all 8 images at once): one dispatch per step with the op, none without.
    expected = {"fused": GENERATE_STEPS, "torch": 0}
    agree = bool(diff.max() <= GENERATE_TOLERANCE)
    return {
        "passed": agree and dispatches == expected and fused.step_impl is StepImpl.fused,
        "model": model.source,
        "backend": f"torch {backend.precision} on {backend.device}",
        "images": len(fused.images),
        "steps": GENERATE_STEPS,
        "step_impl_ran": {"fused": fused.step_impl.value, "torch": eager.step_impl.value},
        "max_abs_difference": diff.max().item(),
        "mean_abs_difference": diff.mean().item(),
        "tolerance": GENERATE_TOLERANCE,
        "op_dispatches": dispatches,
        "expected_dispatches": expected,
    }


# --- 6. the GPU benchmark -----------------------------------------------------------------------

PROMPT = "metal"
BENCH_STEPS = 20
FULL_SIZE_GLYPHS = 64
EMBEDDED_BATCHES = (64, 256, 1024)
# Random weights carry no trained guidance scale; any scale other than 1 costs the same. The
# embedded model's own default.
FULL_SIZE_GUIDANCE = 4.0
REPEATS, WARMUP = 3, 1


def bf16_matmul_flops(device: str = "cuda", size: int = 8192, per_call: int = 10) -> float:
    """The GPU's practical BF16 matrix-multiply rate: the ceiling achieved TFLOP/s are given against.

    Ten products per timed call, so the synchronisation is a small part of what is timed."""
    from glyph_engine.timing import median_seconds

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)

    def products() -> None:
        for _ in range(per_call):
            a @ b

    return per_call * 2 * size**3 / median_seconds(products, repeats=5, warmup=2, device=device)


def counting(backend: Backend, counts: list[int]) -> Backend:
    """`backend` with every U-Net call's batch appended to `counts` (guidance doubles a batch;
    a guidance interval leaves some steps single)."""
    denoise = backend.denoise

    def counted(x: Tensor, timestep: int, text: Tensor, mask: Tensor) -> Tensor:
        counts.append(x.shape[0])
        return denoise(x, timestep, text, mask)

    backend.denoise = counted
    return backend


def peer(model: Glyffuser, batch: int, guidance: float, counts: list[int]) -> Callable[[], object]:
    """The glyffuser's own loop (bench/peer_process.py) on the GPU in FP16: T5, then the diffusers
    U-Net on the batch doubled for guidance at every step, diffusers' DPMSolverMultistepScheduler."""
    from diffusers import DPMSolverMultistepScheduler

    # Plain copies (no channels_last, no graphs: the published loop has neither): FP16 U-Net,
    # FP32 T5 (it overflows in FP16).
    device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.float16
    unet = copy.deepcopy(model.unet).to(device, dtype).eval()
    text_encoder = copy.deepcopy(model.text_encoder).to(device).eval()
    scheduler = DPMSolverMultistepScheduler.from_config(model.scheduler_config)
    noise = torch.randn(batch, *model.image_shape, generator=torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def run() -> Tensor:
        scheduler.set_timesteps(BENCH_STEPS, device=device)
        tokens = model.tokenizer([PROMPT] * batch, padding="longest", return_tensors="pt").to(device)
        text = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state.to(dtype)
        text = torch.cat([torch.zeros_like(text), text])
        mask = torch.cat([torch.ones_like(tokens.attention_mask), tokens.attention_mask])
        image = noise.to(device, dtype)
        for t in scheduler.timesteps:
            counts.append(2 * batch)
            uncond, cond = unet(torch.cat([image, image]), t, text, encoder_attention_mask=mask).sample.chunk(2)
            image = scheduler.step(uncond + guidance * (cond - uncond), t, image).prev_sample
        return image

    return run


def glyph_engine_run(
    model: Glyffuser, backend: Backend, batch: int, guidance: float | None, eager: bool, counts: list[int]
) -> Callable[[], object]:
    from glyph_engine.pipeline import generate
    from glyph_engine.settings import GenerationSettings, StepImpl

    step_impl = StepImpl.torch if eager else StepImpl.auto
    settings = GenerationSettings(steps=BENCH_STEPS, guidance=guidance, step_impl=step_impl)
    backend = counting(backend, counts)
    return lambda: generate(model, backend, [PROMPT], batch, settings)


def measure(make: Callable[[list[int]], Callable[[], object]], batch: int, flops: int, peak: float) -> dict[str, Any]:
    """Median time of one generate of `batch` glyphs, with the system alone on the GPU."""
    from glyph_engine.timing import median_seconds

    gc.collect()
    torch.cuda.empty_cache()  # the previous system's weights and blocks
    counts: list[int] = []
    run = make(counts)
    torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(run, REPEATS, WARMUP, "cuda")
    unet_images = sum(counts) / (REPEATS + WARMUP)
    achieved = flops * unet_images / seconds
    return {
        "images_per_s": batch / seconds,
        "seconds_per_generate": seconds,
        "unet_images_per_generate": unet_images,
        "tflops": achieved / 1e12,
        "of_bf16_peak": achieved / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def bench_case(name: str, model: Glyffuser, batch: int, guidance: float | None, peak: float) -> dict[str, Any]:
    from glyph_engine.backend_factory import create_backend
    from glyph_engine.backends.pytorch import TorchBackend
    from glyph_engine.benchmark import unet_flops_per_image
    from glyph_engine.settings import StepImpl
    from glyph_engine.step import select_step

    flops = unet_flops_per_image(model)
    scale = model.default_guidance if guidance is None else guidance
    chosen = {}

    def fastest(counts: list[int]) -> Callable[[], object]:
        backend = create_backend("auto", model)
        step = select_step(StepImpl.auto, backend.device)[1].value
        chosen["fastest"] = f"{backend.name} {backend.precision} on {backend.device}, step {step}"
        return glyph_engine_run(model, backend, batch, guidance, False, counts)

    makes = {
        "peer": lambda counts: peer(model, batch, scale, counts),
        "eager": lambda counts: glyph_engine_run(
            model, TorchBackend(model, device="cuda", cuda_graphs=False), batch, guidance, True, counts
        ),
        "fastest": fastest,
    }
    systems = {}
    for system, make in makes.items():
        try:
            systems[system] = measure(make, batch, flops, peak)
        except Exception as e:  # out of memory at batch 1024, say: the other systems and cases still run
            systems[system] = {"error": f"{type(e).__name__}: {one_line(e)}"}

    def get(system: str, key: str) -> float | None:
        return systems[system].get(key)

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
        "bf16_matmul_tflops": peak / 1e12,
        "systems": systems,
    }


def full_size_model(folder: Path) -> Glyffuser:
    """The published glyffuser's configuration (131M U-Net, 128x128) and T5-small's shape, random weights."""
    sys.path.insert(0, str(ROOT / "tests"))
    from glyph_engine.checkpoint import load_model
    from glyph_engine.model import GLYFFUSER_UNET_CONFIG

    from factories import T5_SMALL_CONFIG, make_glyffuser_folder, make_text_encoder_folder

    unet = make_glyffuser_folder(folder / "glyffuser", GLYFFUSER_UNET_CONFIG)
    return load_model(unet, str(make_text_encoder_folder(folder / "t5", T5_SMALL_CONFIG)))


def workloads(folder: Path) -> Iterator[tuple[str, Glyffuser, int, float | None]]:
    """(name, model, batch, guidance: None for the model's own) for each benchmark case."""
    from glyph_engine.checkpoint import load_model
    from glyph_engine.model import DEFAULT_CHECKPOINT, unet_parameter_count

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
    embedded = load_model(DEFAULT_CHECKPOINT)
    for batch in EMBEDDED_BATCHES:
        yield f"{described(embedded, 'embedded model')}, batch {batch}", embedded, batch, None


def bench_gpu() -> dict[str, Any]:
    from glyph_engine.timing import matmul_flops_per_second

    peak = bf16_matmul_flops()
    fp16, _ = matmul_flops_per_second("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        entries = [bench_case(name, model, batch, g, peak) for name, model, batch, g in workloads(Path(tmp))]
    return {
        "passed": all("error" not in s for e in entries for s in e["systems"].values()),
        "bf16_matmul_tflops": peak / 1e12,
        "fp16_matmul_tflops": fp16 / 1e12,
        "entries": entries,
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def bench_markdown(result: dict[str, Any], env: dict[str, Any]) -> str:
    lines = [
        f"GPU: {env.get('gpu')}; torch {env.get('torch')}, CUDA {env.get('torch_cuda')}; matrix multiply measured in "
        f"the same run: BF16 {fmt(result.get('bf16_matmul_tflops'), '.0f')} TFLOP/s, "
        f"FP16 {fmt(result.get('fp16_matmul_tflops'), '.0f')} TFLOP/s.",
        f"{BENCH_STEPS} steps, guidance on: the peer doubles the batch at every step, glyph-engine at the steps "
        f"of the model's guidance interval (U-Net images: per generate). Medians of {REPEATS} runs after {WARMUP} "
        "warm-up; TFLOP/s: U-Net FLOPs done / time, against the BF16 rate.",
        "",
        "| case | system | images/s | x peer | s per generate | U-Net images | TFLOP/s | of BF16 peak "
        "| peak memory GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in result.get("entries", []):
        peer_rate = entry["peer_images_per_s"]
        for system, s in entry["systems"].items():
            label = f"fastest ({entry['fastest']})" if system == "fastest" else system
            if "error" in s:
                lines.append(f"| {entry['name']} | {label} | {s['error']} | | | | | | |")
                continue
            ratio = f"{s['images_per_s'] / peer_rate:.2f}x" if peer_rate else "-"
            lines.append(
                f"| {entry['name']} | {label} | {s['images_per_s']:.1f} | {ratio} | {s['seconds_per_generate']:.3f} "
                f"| {s['unet_images_per_generate']:.0f} | {s['tflops']:.1f} | {s['of_bf16_peak']:.1%} "
                f"| {s['peak_memory_gib']:.2f} |"
            )
    return "\n".join(lines) + "\n"


# --- the run --------------------------------------------------------------------------------------


def one_line(error: object) -> str:
    return " ".join(str(error).split())[:300]


def run_section(name: str, section: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs one section; an exception fails that section only, so one pass reports on all of them."""
    start = time.perf_counter()
    try:
        result = section()
    except Exception as e:  # recorded with its traceback; the next sections still run
        result = {"passed": False, "error": f"{type(e).__name__}: {one_line(e)}"}
        result["traceback"] = traceback.format_exc().splitlines()[-15:]
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"gpu-check: {name}: {verdict(result)} ({result['seconds']} s)", flush=True)
    return result


def state(result: dict[str, Any]) -> str:
    return {True: "passed", False: "FAILED", None: "recorded"}[result["passed"]]


def verdict(result: dict[str, Any]) -> str:
    return f"{state(result)}: {result['error']}" if "error" in result else state(result)


def write(out: Path, name: str, content: str | dict[str, Any] | list[Any]) -> None:
    if name not in FILES:
        raise ValueError(f"{name} is not one of the {len(FILES)} result files")
    text = content if isinstance(content, str) else json.dumps(content, indent=2, default=str) + "\n"
    (out / name).write_text(text)


def notes(name: str, result: dict[str, Any]) -> str:
    """The line of summary.md that says what a section found."""
    if "error" in result:
        return result["error"]
    if name == "parity":
        errors = {}
        for case in result["cases"]:
            if "max_abs_error" in case:
                key = f"{case['device']} {case['dtype']}"
                errors[key] = max(errors.get(key, 0.0), case["max_abs_error"])
        worst = ", ".join(f"{k} {v:.2g}" for k, v in errors.items())
        return (
            f"{len(result['cases'])} cases, {len(result['failed'])} failed, {len(result['skipped'])} skipped; "
            f"max abs error: {worst}; op built in {result['build_seconds']} s"
        )
    if name in PYTEST_SECTIONS:
        return result["summary"]
    if name == "generate":
        return f"max abs difference {result['max_abs_difference']:.2g}, op dispatches {result['op_dispatches']}"
    if name == "benchmark":
        return "; ".join(
            f"{e['name']}: {fmt(e['images_per_s'], '.1f')} images/s, peer {fmt(e['peer_images_per_s'], '.1f')}"
            for e in result["entries"]
        )
    return ", ".join(f"{k} {result.get(k)}" for k in ("gpu", "torch", "torch_cuda"))


def outputs(results: dict[str, dict[str, Any]], cuda: bool) -> dict[str, str | dict[str, Any] | list[Any]]:
    """The result files of the sections run so far, and the summary."""
    files: dict[str, str | dict[str, Any] | list[Any]] = {}
    for name, file in (("environment", "environment.json"), ("parity", "parity.json"), ("generate", "generate.json")):
        if name in results:
            files[file] = results[name]
    runs = [results[name] for name in PYTEST_SECTIONS if name in results]
    if runs:
        files["pytest.md"] = pytest_markdown(runs)
    if "benchmark" in results:
        files["bench-gpu.json"] = results["benchmark"].get("entries", results["benchmark"])
        files["bench-gpu.md"] = bench_markdown(results["benchmark"], results["environment"])
    summary = ["| section | result | seconds | notes |", "| --- | --- | ---: | --- |"]
    summary += [f"| {n} | {state(r)} | {r['seconds']} | {notes(n, r)} |" for n, r in results.items()]
    files["summary.md"] = "\n".join([*summary, *(() if cuda else ("", NO_GPU))]) + "\n"
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-results"))
    parser.add_argument("--skip-suite", action="store_true", help="skip the whole-suite pytest run")
    parser.add_argument("--quick", action="store_true", help="a smaller parity sweep")
    args = parser.parse_args()

    started = time.monotonic()
    wheels = install_missing()  # may restart this script
    args.out.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # the folder holds this run's results only
        (args.out / name).unlink(missing_ok=True)
    cuda = torch.cuda.is_available()
    plan: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("environment", lambda: environment(wheels)),
        ("parity", lambda: parity(cuda, args.quick)),
    ]
    if cuda:
        plan += [
            ("pytest -m gpu", lambda: pytest_run("pytest -m gpu", ["-m", "gpu"], timeout=300)),
            ("generate", generate_on_cuda),
            ("benchmark", bench_gpu),
        ]
        # Last: the longest section and the least GPU-specific; what ran before is written by then.
        if not args.skip_suite:
            plan.append(("pytest (whole suite)", lambda: whole_suite(started)))
    results: dict[str, dict[str, Any]] = {}
    for name, section in plan:
        results[name] = run_section(name, section)
        for file, content in outputs(results, cuda).items():  # after every section: a cut-off pass keeps its results
            write(args.out, file, content)
    if not cuda:
        print(NO_GPU)
    return 0 if all(r["passed"] is not False for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
