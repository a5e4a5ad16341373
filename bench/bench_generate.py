"""End-to-end generation throughput against steps, per backend, beside the glyffuser's loop.

`pytest bench/bench_generate.py --benchmark-only`. The same grid and workloads as
`glyph-engine bench` (`glyph_engine.benchmark`): the peer is the glyffuser's published
sampling loop on the same weights, noise, batch and steps; groups put each backend beside
it. Every case names its device; CUDA work is synchronised before the clock is read.
"""

import pytest

from glyph_engine.benchmark import PEER, BenchConfig, generation, peer_device
from glyph_engine.pipeline import encode_prompts
from glyph_engine.timing import synchronized

GRID = BenchConfig()
CASES = [("small", b, s) for b in GRID.batch_sizes for s in GRID.steps] + [("full", 1, s) for s in (1, 2)]


@pytest.mark.parametrize("backend_name", [PEER, "torch", "onnxruntime", "openvino"])
@pytest.mark.parametrize("size, batch, steps", CASES, ids=[f"{m}-b{b}-s{s}" for m, b, s in CASES])
def test_generate(benchmark, bench_model, bench_backend, size, batch, steps, backend_name):
    model, _ = bench_model(size)
    backend = None if backend_name == PEER else bench_backend(size, backend_name)
    device = peer_device(model) if backend is None else backend.device
    benchmark.group = f"generate {size} batch {batch}, {steps} steps"
    benchmark.extra_info["device"] = str(device)
    run = synchronized(generation(model, backend, batch, steps, GRID.guidance), device)
    benchmark.pedantic(run, rounds=1 if size == "full" else GRID.repeats, warmup_rounds=GRID.warmup, iterations=1)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median


@pytest.mark.parametrize("backend_name", ["torch", "onnxruntime", "openvino"])
@pytest.mark.parametrize("prompts", [1, 16])
def test_text_encoding(benchmark, bench_model, bench_backend, backend_name, prompts):
    model, _ = bench_model("small")
    backend = bench_backend("small", backend_name)
    texts = [f"a definition of glyph number {i}; metal, water and wood" for i in range(prompts)]
    benchmark.group = f"text encoding, {prompts} prompts"
    benchmark.extra_info["device"] = str(backend.device)
    run = synchronized(lambda: encode_prompts(model, backend, texts), backend.device)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
