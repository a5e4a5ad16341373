"""Whole-process wall time of `glyph-engine generate "metal" -n 64` against the peer, interleaved.

    python bench/wall_clock.py [--runs 3] [--guidance G] [--ckpt M] [--peer-ckpt T] \
        [--also-warm inductor] [--isa avx2] [--out bench-results/wall-clock.json]

Each round runs, one after another: the peer process (`bench/peer_process.py`), `generate`
with an empty artifact cache (cold: the first run on a fresh machine, compiling included),
`generate` again with the cache that run filled (warm: every later run) and `generate
--backend torch` (eager PyTorch FP32, the default before the compiled CPU path), and with
`--also-warm BACKEND` a warm `generate --backend BACKEND`. Interleaving
spreads the drift of a shared machine's speed over all three; medians are reported, and
every run's time is kept. Every process gets the same `--guidance` (default: the embedded
model's own, what `generate` uses without the option); generate guides only the steps of
the model's guidance interval, the peer every step. The CPU and its flags, and the
guidance, are recorded with the results. generate runs `--ckpt` (default: the embedded
default model, a distilled student where one passed its gate) at its own steps; the peer runs
its teacher (`--peer-ckpt`, default the embedded glyffuser-small) at 20 steps, as the
glyffuser samples.

`--isa` runs every process, the peer's included, as on a smaller CPU kind: PyTorch's and
OpenVINO's kernels capped at that instruction set (`glyph_engine.cpu.kernel_caps`: oneDNN's,
and for AVX2 ATen's and MKL's), glyph-engine choosing as there (fp32 below BF16). Same cores,
caches and clock: an estimate of that kind, named as such in the results, not a measurement on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from glyph_engine.checkpoint import load_model
from glyph_engine.cpu import CPU_KIND_ISAS, cpu_info, kernel_caps
from glyph_engine.model import DEFAULT_CHECKPOINT, TEACHER_MODEL
from glyph_engine.startup import time_process

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--guidance", type=float, default=None, help="default: the embedded model's")
    parser.add_argument("--ckpt", default=None, help="generate's model [default: the embedded default]")
    parser.add_argument("--peer-ckpt", default=TEACHER_MODEL, help="the peer's (a teacher's) weights")
    parser.add_argument(
        "--also-warm", default=None, metavar="BACKEND",
        help="also time a warm `generate --backend BACKEND` each round (its cache built once, before the rounds, "
        "and that cold run timed once): for backends whose first use compiles for minutes (inductor)",
    )  # fmt: skip
    parser.add_argument(
        "--isa", choices=sorted(CPU_KIND_ISAS.values()), default=None,
        help="cap every process's kernels at this instruction set, as on that CPU kind (an estimate of it)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench-results/wall-clock.json"))
    args = parser.parse_args()
    # Set here, before any kernel runs, so this process's CPU record and every child follow it.
    caps = kernel_caps(args.isa) if args.isa else {}
    os.environ.update(caps)
    model = load_model(args.ckpt or DEFAULT_CHECKPOINT)
    teacher = load_model(args.peer_ckpt)
    # Decided once here and handed to every process: the peer and generate at the same scale.
    guidance = model.default_guidance if args.guidance is None else args.guidance

    times: dict[str, list[float]] = {"peer": [], "cold": [], "warm": [], "torch eager": []}
    with tempfile.TemporaryDirectory() as tmp:
        image = str(Path(tmp) / "glyphs.png")
        shared = ["-n", str(args.n), "--guidance", str(guidance)]
        peer = [sys.executable, str(HERE / "peer_process.py"), "--ckpt", args.peer_ckpt, *shared]
        chosen = ["--ckpt", args.ckpt] if args.ckpt else []
        generate = ["glyph-engine", "generate", "metal", *shared, *chosen, "-o", image, "-q"]
        also = []
        if args.also_warm:
            also = [*generate, "--backend", args.also_warm, "--precision", args.precision]
            also_env = {**os.environ, "GLYPH_ENGINE_CACHE": str(Path(tmp) / "cache-also")}
            times[f"cold {args.also_warm} (once)"] = [time_process(also, also_env)]
            times[f"warm {args.also_warm}"] = []
        for run in range(args.runs):
            cache = Path(tmp) / f"cache-{run}"
            env = {**os.environ, "GLYPH_ENGINE_CACHE": str(cache)}
            times["peer"].append(time_process(peer, env))
            times["cold"].append(time_process([*generate, "--precision", args.precision], env))
            times["warm"].append(time_process([*generate, "--precision", args.precision], env))
            # The previous default: eager PyTorch FP32 in the same process shape.
            times["torch eager"].append(time_process([*generate, "--backend", "torch"], env))
            if also:
                times[f"warm {args.also_warm}"].append(time_process(also, also_env))
            print({k: round(v[-1], 2) for k, v in times.items()}, file=sys.stderr)

    medians = {k: statistics.median(v) for k, v in times.items()}
    cpu = cpu_info()
    report = {
        "cpu": cpu.model,
        "cpu_flags": list(cpu.flags),
        "cores": cpu.cores,
        "kernel_caps": caps,
        "command": " ".join([*generate[:-3], "--precision", args.precision]),
        "guidance": guidance,  # the peer's and generate's; generate guides the steps of the model's interval
        "model": {"source": model.source, "sha256": model.sha256, "steps": model.default_steps},
        "peer_model": {"source": teacher.source, "sha256": teacher.sha256},
        "runs_s": times,
        "median_s": medians,
        "peer_over_warm": medians["peer"] / medians["warm"],
        "peer_over_cold": medians["peer"] / medians["cold"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(
        "| run | times (s) | median (s) | speed-up vs peer |\n| --- | --- | ---: | ---: |\n"
        + "\n".join(
            f"| {k} | {', '.join(f'{t:.1f}' for t in v)} | {medians[k]:.1f} | {medians['peer'] / medians[k]:.2f}x |"
            for k, v in times.items()
        )
    )


if __name__ == "__main__":
    main()
