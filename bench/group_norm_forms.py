"""The OpenVINO U-Net with torch's GroupNorm against GroupNorm as per-channel sums, paired.

    python bench/group_norm_forms.py [--sizes small,full] [--precision fp32] [--isa avx2] [--rounds 9]
                                     [--out bench-results/group-norm-forms.json]

Two OpenVINO backends are built through the engine's own route (`Session`, a cache each),
one whose graph keeps torch's GroupNorm and one whose graph has it as per-channel sums
(`openvino_build.graph_form`, which the fp32 default takes), and called alternately at the
rows one round of `generate` gives them (as `bench/unet_rate.py`). Reports the medians,
their ratio and how far the two outputs differ. `--isa` caps the kernels as
`bench/wall_clock.py --isa` does. The CPU, its flags and any cap are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from unet_rate import ROWS, load  # the same models and round sizes

import glyph_engine.openvino_build as openvino_build
from glyph_engine.cpu import CPU_KIND_ISAS, kernel_caps, kernel_cpu
from glyph_engine.session import ModelSource, Session
from glyph_engine.settings import BackendName, Precision


def backend_with(form: str, model, precision: Precision, cache: Path):
    """The OpenVINO backend whose U-Net graph has GroupNorm in `form` ("torch" or "sums")."""
    chosen = openvino_build.graph_form
    openvino_build.graph_form = lambda p: form
    try:
        source = ModelSource(backend=BackendName.openvino, precision=precision, cache_dir=cache)
        return Session.load(source, model=model).backend
    finally:
        openvino_build.graph_form = chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--isa", choices=sorted(CPU_KIND_ISAS.values()), default=None)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("bench-results/group-norm-forms.json"))
    args = parser.parse_args()
    caps = kernel_caps(args.isa) if args.isa else {}
    os.environ.update(caps)  # before any kernel runs: each library reads its cap once
    precision = Precision(args.precision)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            model = load(size, Path(tmp) / size)
            backends = {
                form: backend_with(form, model, precision, Path(tmp) / f"{size}-{form}") for form in ("torch", "sums")
            }
            ids, mask = model.prompt_tokenizer(["metal"])
            text = backends["torch"].encode_text(ids, mask)
            for batch in ROWS[size]:
                x = torch.randn(batch, *model.image_shape, generator=torch.Generator().manual_seed(0))
                call = (x, 500, text.expand(batch, -1, -1), mask.expand(batch, -1))
                outputs = {form: b.denoise(*call) for form, b in backends.items()}  # also compiles this size
                times: dict[str, list[float]] = {form: [] for form in backends}
                for _ in range(args.rounds):
                    for form, b in backends.items():
                        start = time.perf_counter()
                        b.denoise(*call)
                        times[form].append(time.perf_counter() - start)
                median = {form: sorted(t)[len(t) // 2] for form, t in times.items()}
                difference = (outputs["sums"] - outputs["torch"]).abs().max() / outputs["torch"].abs().max()
                rows.append({
                    "model": size, "rows": batch, "precision": precision.value, "torch_s": median["torch"],
                    "sums_s": median["sums"], "speed_up": median["torch"] / median["sums"],
                    "max_difference": float(difference), "times": times,
                })  # fmt: skip
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "times"}))
    cpu = kernel_cpu()
    report = {"cpu": cpu.model, "cpu_flags": list(cpu.flags), "cores": cpu.cores, "kernel_caps": caps, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"CPU: {cpu.model}, {cpu.cores} cores")
    print("| model | rows | precision | torch's GroupNorm (s) | sums (s) | speed-up | max difference |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['model']} | {r['rows']} | {r['precision']} | {r['torch_s']:.3f} | {r['sums_s']:.3f} | "
            f"{r['speed_up']:.3f}x | {r['max_difference']:.1e} |"
        )


if __name__ == "__main__":
    main()
