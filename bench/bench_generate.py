"""End-to-end generation throughput against steps, per backend, beside the glyffuser's loop.

`pytest bench/bench_generate.py --benchmark-only`. The peer is the glyffuser's published
sampling loop (T5, diffusers U-Net and DPMSolverMultistepScheduler, eager PyTorch) on the
same weights, noise, batch and steps; groups put each backend beside it. Unguided: the
published loop has no classifier-free guidance.
"""

import pytest
from diffusers import DPMSolverMultistepScheduler

from glyph_engine.backends.onnx_runtime import OnnxRuntimeBackend
from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.benchmark import peer_generate
from glyph_engine.pipeline import GenerationSettings, generate, image_seeds
from glyph_engine.sampler import initial_noise

CASES = [("small", 16, s) for s in (1, 2, 5, 10, 20, 50)] + [("full", 1, s) for s in (1, 2)]


@pytest.mark.parametrize("backend", ["peer", "torch", "onnxruntime"])
@pytest.mark.parametrize("size, batch, steps", CASES, ids=[f"{m}-b{b}-s{s}" for m, b, s in CASES])
def test_generate(benchmark, bench_model, size, batch, steps, backend):
    model, export_dir = bench_model(size)
    benchmark.group = f"generate {size} batch {batch}, {steps} steps"
    if backend == "peer":
        noise = initial_noise(image_seeds(0, batch), model.image_shape)
        run = (peer_generate, (model, DPMSolverMultistepScheduler(), ["metal"] * batch, noise, steps))
    else:
        runner = TorchBackend(model) if backend == "torch" else OnnxRuntimeBackend(model, export_dir)
        run = (generate, (model, runner, ["metal"], batch, GenerationSettings(steps=steps, guidance=1.0)))
    rounds = 1 if size == "full" else 3
    benchmark.pedantic(run[0], args=run[1], rounds=rounds, warmup_rounds=1, iterations=1)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("prompts", [1, 16])
def test_text_encoding(benchmark, bench_model, backend, prompts):
    from glyph_engine.pipeline import encode_prompts

    model, export_dir = bench_model("small")
    runner = TorchBackend(model) if backend == "torch" else OnnxRuntimeBackend(model, export_dir)
    texts = [f"a definition of glyph number {i}; metal, water and wood" for i in range(prompts)]
    benchmark.group = f"text encoding, {prompts} prompts"
    benchmark.pedantic(encode_prompts, args=(model, runner, texts), rounds=5, warmup_rounds=1, iterations=1)
