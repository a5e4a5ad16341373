"""End-to-end generation throughput against steps, per backend, beside the glyffuser's loop.

`pytest bench/bench_generate.py --benchmark-only`. The same grid and workloads as
`glyph-engine bench` (`glyph_engine.benchmark`): the peer is the glyffuser's published
sampling loop (`glyph_engine.peer`) on the same weights, noise, batch, steps and guidance;
groups put each backend beside it. Every case names its device; CUDA work is synchronised
before the clock is read.
"""

import pytest

from glyph_engine.benchmark import PEER, BenchConfig, generation
from glyph_engine.peer import PEER_SAMPLER, Peer
from glyph_engine.timing import synchronized

GRID = BenchConfig()
CASES = [("small", b, s) for b in GRID.batch_sizes for s in GRID.steps] + [("full", 1, s) for s in (1, 2)]
# The peer runs diffusers' own sampler; glyph-engine's backends run each sampler of the grid.
SYSTEMS = [(PEER, PEER_SAMPLER)] + [(b, s) for b in ("torch", "onnxruntime", "openvino") for s in GRID.samplers]


@pytest.mark.parametrize("backend_name, sampler", SYSTEMS, ids=[f"{b}-{s}" for b, s in SYSTEMS])
@pytest.mark.parametrize("size, batch, steps", CASES, ids=[f"{m}-b{b}-s{s}" for m, b, s in CASES])
def test_generate(benchmark, bench_model, bench_backend, size, batch, steps, backend_name, sampler):
    model, _ = bench_model(size)
    backend = None if backend_name == PEER else bench_backend(size, backend_name)
    system = Peer(model) if backend is None else backend
    benchmark.group = f"generate {size} batch {batch}, {steps} steps, guidance {GRID.guidance:g}"
    benchmark.extra_info.update(
        device=str(system.device), precision=system.precision, sampler=sampler, guidance=GRID.guidance
    )
    run = synchronized(generation(model, backend, batch, steps, GRID.guidance, sampler), system.device)
    benchmark.pedantic(run, rounds=1 if size == "full" else GRID.repeats, warmup_rounds=GRID.warmup, iterations=1)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median


@pytest.mark.parametrize("backend_name", ["torch", "onnxruntime", "openvino"])
@pytest.mark.parametrize("prompts", [1, 16])
def test_text_encoding(benchmark, bench_model, bench_backend, backend_name, prompts):
    """Tokenizing and the backend's T5, as generate encodes its prompts."""
    model, _ = bench_model("small")
    backend = bench_backend("small", backend_name)
    texts = [f"a definition of glyph number {i}; metal, water and wood" for i in range(prompts)]

    def encode():
        tokens = model.tokenizer(
            texts, padding="longest", max_length=model.max_text_length, truncation=True, return_tensors="pt"
        )
        return backend.encode_text(tokens.input_ids, tokens.attention_mask)

    benchmark.group = f"text encoding, {prompts} prompts"
    benchmark.extra_info["device"] = str(backend.device)
    benchmark.pedantic(synchronized(encode, backend.device), rounds=5, warmup_rounds=1, iterations=1)
