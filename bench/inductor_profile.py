"""Where the inductor-compiled U-Net's time goes, by kernel kind: what `--backend inductor`
compiles, and the same U-Net as diffusers runs it (its attention processors, torch's
GroupNorm), side by side.

    python bench/inductor_profile.py [--precision bf16] [--batch 128] [--text-length 2] [--out docs/inductor-profile]

The packages `--backend inductor` builds are compiled ahead of time and their kernels are not
visible to torch's profiler, so this compiles the same modules (`inductor_build.unet_module`,
and the U-Net as diffusers runs it) just in time with inductor's kernel profiling on: the
same code generator, with each generated kernel recorded under its name. Times are each
kernel's own (self) time per call, summed by kind; attention calls are split by shape (self-
or cross-attention). The default text length is that of `generate "metal"` (the prompt and
the empty unconditional prompt: 2 tokens). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

from glyph_engine.checkpoint import load_model
from glyph_engine.cpu import cpu_info
from glyph_engine.inductor_build import at_precision, unet_module
from glyph_engine.model import TEACHER_CHECKPOINT
from glyph_engine.settings import Precision
from glyph_engine.to_onnx import UNetForExport

# Kernel names list the ops they fuse: GroupNorm as sums (glyph_engine.group_norm) shows as
# sums and the SiLU after it.
FUSED_KINDS = {
    "group_norm": "group_norm",
    "layer_norm": "layer_norm",
    "gelu": "gelu",
    "softmax": "softmax",
    "silu": "GroupNorm as sums (+SiLU)",
    "_sum_": "GroupNorm as sums (+SiLU)",
}


def kind(name: str, shapes: list) -> str:
    """A profiler event's kind: generated kernels by the op they fuse, attention by its shape."""
    if name.startswith("graph_") and "cpp_fused" in name:
        return "generated: " + next((label for op, label in FUSED_KINDS.items() if op in name), "other element-wise")
    if "scaled_dot_product" in name:
        query, key = shapes[0], shapes[1]
        return f"attention kernel ({'self' if query[2] == key[2] else 'cross'}, {query[2]}x{key[2]} tokens)"
    return name


def profile_module(module: torch.nn.Module, inputs: tuple, calls: int) -> dict[str, float]:
    compiled = torch.compile(module.eval(), dynamic=False)
    with torch.no_grad():
        for _ in range(2):
            compiled(*inputs)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as run:
            for _ in range(calls):
                compiled(*inputs)
    totals: dict[str, float] = defaultdict(float)
    for event in run.key_averages(group_by_input_shape=True):
        if event.key.startswith(("## Call", "Torch", "Pregraph", "AOTDispatcher")):
            continue  # wrappers: their time is their children's
        totals[kind(event.key, event.input_shapes)] += event.self_cpu_time_total / 1e3 / calls
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--text-length", type=int, default=2)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-results/inductor-profile"))
    args = parser.parse_args()

    torch._inductor.config.cpp.enable_kernel_profile = True
    torch._inductor.config.freezing = True  # as inductor_build.compile_package compiles
    model = load_model(TEACHER_CHECKPOINT)
    precision = Precision(args.precision)
    modules = {
        # The model's own modules: diffusers' attention processors, torch's GroupNorm.
        "as diffusers runs it": at_precision(UNetForExport(model.unet), precision),
        "as --backend inductor compiles it (einsum cross-attention, GroupNorm as sums)": unet_module(model, precision),
    }
    generator = torch.Generator().manual_seed(0)
    rows, length = args.batch, args.text_length
    inputs = (
        torch.randn(rows, *model.image_shape, generator=generator),
        torch.full((rows,), 500.0),
        torch.randn(rows, length, model.unet.config.cross_attention_dim, generator=generator) * 0.2,
        torch.ones(rows, length, dtype=torch.long),
    )
    results = {name: profile_module(module, inputs, args.calls) for name, module in modules.items()}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    cpu = cpu_info()
    options = {k: str(v) for k, v in vars(args).items()}
    record = {"cpu": cpu.model, "cpu_flags": sorted(cpu.flags), "torch": torch.__version__, **options}
    record["ms_per_call"] = results
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    kinds = list(dict.fromkeys(k for totals in results.values() for k in totals))
    names = list(results)
    lines = [
        f"# The inductor-compiled U-Net's time by kernel kind ({args.precision}, batch {rows}, {length} text tokens)",
        "",
        f"`python bench/inductor_profile.py --precision {args.precision} --batch {rows} --text-length {length}`; "
        f"CPU: {cpu.model}; torch {torch.__version__}. "
        f"Each kernel's own time per call (ms), mean of {args.calls} calls.",
        "",
        "| kernel kind | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
        *(f"| {k} | " + " | ".join(f"{results[n].get(k, 0.0):.1f}" for n in names) + " |" for k in kinds if
          max(results[n].get(k, 0.0) for n in names) >= 0.5),
        "| **all kernels** | " + " | ".join(f"**{sum(results[n].values()):.1f}**" for n in names) + " |",
    ]  # fmt: skip
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
