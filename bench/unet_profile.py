"""Where the OpenVINO U-Net's time goes, by layer kind: what bounds its share of the matmul peak.

    python bench/unet_profile.py [--precision bf16] [--batch 128] [--out docs/unet-profile]

Compiles the embedded model's U-Net as one request over all cores (`compile_config` with one
stream; bf16 runs now split a round into one request per core) with OpenVINO's per-node
performance counters on, runs it at the batch `generate "metal" -n 64`
uses on guided steps, and sums each node's time over several calls by node type and by the
kernel OpenVINO chose (its exec type, e.g. brgconv_avx512_amx). Also records the U-Net's
FLOPs (torch's counter), the same run's matmul peak, and the whole call's time, so the
share of the peak the convolutions and matmuls reach on their own can be read off.
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import openvino as ov
import torch
from cpu_candidates import exported_unet  # the graph `glyph-engine export` writes

from glyph_engine.benchmark import unet_flops_per_image
from glyph_engine.checkpoint import load_model
from glyph_engine.cpu import cpu_info
from glyph_engine.model import DEFAULT_CHECKPOINT
from glyph_engine.timing import matmul_peak, median_seconds


class PositionalUNet(torch.nn.Module):
    """The diffusers U-Net on the export's positional inputs (for OpenVINO's PyTorch frontend)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, text, mask):
        out = self.unet(sample, timestep, encoder_hidden_states=text, encoder_attention_mask=mask, return_dict=False)
        return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument(
        "--frontend", default="onnx", choices=["onnx", "pytorch"],
        help="onnx: the graph the default path builds; pytorch: OpenVINO's PyTorch frontend on the module",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench-results/unet-profile"))
    args = parser.parse_args()

    model = load_model(DEFAULT_CHECKPOINT)
    core = ov.Core()
    generator = torch.Generator().manual_seed(0)
    channels, height, width = model.image_shape
    rows = args.batch
    inputs = (
        torch.randn(rows, channels, height, width, generator=generator),
        torch.full((rows,), 500.0),
        torch.randn(rows, 4, model.text_encoder.config.d_model, generator=generator) * 0.2,
        torch.ones(rows, 4, dtype=torch.long),
    )
    if args.frontend == "onnx":
        graph = core.read_model(exported_unet(DEFAULT_CHECKPOINT))
    else:
        with torch.no_grad():
            graph = ov.convert_model(PositionalUNet(model.unet).eval(), example_input=inputs)
    # One stream (`backends.openvino.compile_config` without streams), counters on.
    hint = {"fp32": "f32", "bf16": "bf16"}[args.precision]
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint, "PERF_COUNT": "YES"}
    request = core.compile_model(graph, "CPU", config).create_infer_request()
    # Each input in the dtype the graph declares, in the graph's order.
    feed = [
        value.numpy().astype(port.get_element_type().to_dtype())
        for value, port in zip(inputs, graph.inputs, strict=True)
    ]
    request.infer(feed)  # warm-up: first-call allocations are not the kernels' time
    by_type: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, float] = defaultdict(float)
    for _ in range(args.calls):
        request.infer(feed)
        for node in request.profiling_info:
            seconds = node.real_time.total_seconds()
            by_type[node.node_type] += seconds / args.calls
            by_kernel[f"{node.node_type} / {node.exec_type}"] += seconds / args.calls
    call_s = median_seconds(lambda: request.infer(feed), 5, 1, "cpu")
    flops = unet_flops_per_image(model, text_length=4) * args.batch
    peak = matmul_peak("cpu", args.precision).flops_per_s
    cpu = cpu_info()
    total = sum(by_type.values())
    report = {
        "cpu": cpu.model,
        "cpu_flags": list(cpu.flags),
        "openvino": ov.get_version(),
        "precision": args.precision,
        "frontend": args.frontend,
        "batch": args.batch,
        "call_s": call_s,
        "counted_s": total,
        "unet_flops": flops,
        "matmul_peak_flops_per_s": peak,
        "of_peak": flops / call_s / peak if peak else None,
        # Convolutions and matmuls carry the FLOPs: their rate alone, as if nothing else ran.
        "compute_layers_of_peak": (
            flops / sum(s for t, s in by_type.items() if t in ("Convolution", "MatMul", "FullyConnected")) / peak
            if peak
            else None
        ),
        "by_type_s": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        "by_kernel_s": dict(sorted(by_kernel.items(), key=lambda kv: -kv[1])),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    total = r["counted_s"]
    lines = [
        f"OpenVINO {r['openvino']} ({r['frontend']} frontend), {r['precision']}, batch {r['batch']}, "
        f"{r['cpu']}: one U-Net call "
        f"{r['call_s'] * 1e3:.1f} ms ({total * 1e3:.1f} ms in the per-node counters), "
        f"{r['unet_flops'] / 1e9:.1f} GFLOP, matmul peak {r['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s: "
        f"{r['of_peak']:.1%} of peak; the convolutions and matmuls alone at "
        f"{r['compute_layers_of_peak']:.1%}.",
        "",
        "| node type | ms per call | share |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {t} | {s * 1e3:.1f} | {s / total:.1%} |" for t, s in r["by_type_s"].items() if s / total >= 0.005]
    lines += ["", "| node type / kernel | ms per call | share |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {s * 1e3:.1f} | {s / total:.1%} |" for k, s in list(r["by_kernel_s"].items())[:15]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
