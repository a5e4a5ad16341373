"""The U-Net's rate against this CPU's matrix-multiply peak, as `generate` runs it, for the
embedded model and the full-size glyffuser configuration, in one run.

    python bench/unet_rate.py [--sizes small,full] [--isa avx2] [--backends auto,inductor]
                              [--repeats 3] [--out bench-results/unet-rate.json]

Each model runs through the engine's own route (`Session`, precision `auto`, each backend of
`--backends` in turn, a cache of its own), one U-Net call at the rows one round of `generate`
gives it: 128 and 64 for the embedded 32x32 model (its guided and unguided steps at `-n 64`), 4 for the full-size
128x128 one (a round holds as many pixels as 64 small glyphs). Its FLOPs (torch's counter)
over the call's median time, against the same run's matmul peak in the precision the backend
runs (`timing.matmul_peak`). The full-size model has random weights: speed does not depend
on their values. `--isa` caps the kernels at a smaller CPU kind's instructions, as
`bench/wall_clock.py --isa` does (an estimate of that kind). The CPU, its flags and any cap on
its kernels are recorded.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from glyph_engine.backends.base import Backend
from glyph_engine.benchmark import unet_flops_per_image
from glyph_engine.checkpoint import load_model
from glyph_engine.cpu import CPU_KIND_ISAS, kernel_caps, kernel_cpu
from glyph_engine.model import GLYFFUSER_UNET_CONFIG, TEACHER_CHECKPOINT, Glyffuser
from glyph_engine.session import ModelSource, Session
from glyph_engine.settings import BackendName
from glyph_engine.timing import MatmulPeak, matmul_peak, median_seconds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the full-size model's factories
from factories import T5_SMALL_CONFIG, make_glyffuser_folder, make_text_encoder_folder  # noqa: E402

ROWS = {"small": (128, 64), "full": (4,)}


def load(size: str, root: Path):
    if size == "small":
        return load_model(TEACHER_CHECKPOINT)
    ckpt = make_glyffuser_folder(root / "glyffuser", GLYFFUSER_UNET_CONFIG)
    return load_model(ckpt, str(make_text_encoder_folder(root / "t5", T5_SMALL_CONFIG)))


def rates(backend: Backend, model: Glyffuser, size: str, repeats: int, peaks: dict[str, MatmulPeak]) -> list[dict]:
    """One row per round size of `size`: `backend`'s U-Net call against its precision's peak
    (measured once per run and precision into `peaks`)."""
    rows = []
    ids, mask = model.prompt_tokenizer(["metal"])
    text = backend.encode_text(ids, mask)
    flops = unet_flops_per_image(model, text_length=ids.shape[1])
    for batch in ROWS[size]:
        x = torch.randn(batch, *model.image_shape, generator=torch.Generator().manual_seed(0))
        texts, masks = text.expand(batch, -1, -1), mask.expand(batch, -1)
        # The first call compiles this size (OpenVINO): a warm-up, not timed.
        call = functools.partial(backend.denoise, x, 500, texts, masks)
        seconds = median_seconds(call, repeats, warmup=1, device="cpu")
        if backend.precision not in peaks:
            peaks[backend.precision] = matmul_peak("cpu", backend.precision)
        peak = peaks[backend.precision].flops_per_s
        rate = flops * batch / seconds
        rows.append({
            "model": size, "image": list(model.image_shape), "rows": batch, "backend": backend.name,
            "precision": backend.precision, "gflop_per_image": flops / 1e9, "call_s": seconds,
            "gflop_per_s": rate / 1e9, "of_peak": None if peak is None else rate / peak,
        })  # fmt: skip
        print(json.dumps(rows[-1]))
    return rows


def backend_names(text: str) -> list[BackendName]:
    try:
        return [BackendName(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: names among {', '.join(b.value for b in BackendName)}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--isa", choices=sorted(CPU_KIND_ISAS.values()), default=None)
    parser.add_argument(
        "--backends",
        type=backend_names,
        default=[BackendName.auto],
        help="comma-separated, as `generate --backend` names them (default: auto)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/unet-rate.json"))
    args = parser.parse_args()
    caps = kernel_caps(args.isa) if args.isa else {}
    os.environ.update(caps)  # before any kernel runs: each library reads its cap once
    rows, peaks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            model = load(size, Path(tmp) / size)
            for name in args.backends:
                source = ModelSource(backend=name, cache_dir=Path(tmp) / f"cache-{size}-{name.value}")
                rows += rates(Session.load(source, model=model).backend, model, size, args.repeats, peaks)
    cpu = kernel_cpu()
    report = {
        "cpu": cpu.model, "cpu_flags": list(cpu.flags), "cores": cpu.cores, "kernel_caps": caps,
        "torch": torch.__version__,
        "peaks_gflop_per_s": {p: None if k.flops_per_s is None else k.flops_per_s / 1e9 for p, k in peaks.items()},
        "rows": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"CPU: {cpu.model}, {cpu.cores} cores; peaks (GFLOP/s): {report['peaks_gflop_per_s']}")
    print("| model | rows | backend | precision | GFLOP/image | call (s) | GFLOP/s | of its precision's peak |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        share = "-" if r["of_peak"] is None else f"{r['of_peak']:.1%}"
        print(
            f"| {r['model']} | {r['rows']} | {r['backend']} | {r['precision']} | {r['gflop_per_image']:.2f} | "
            f"{r['call_s']:.3f} | {r['gflop_per_s']:.0f} | {share} |"
        )


if __name__ == "__main__":
    main()
