"""The PyTorch backend behind the Backend interface, on the CPU and (marked) on a GPU."""

import pytest
import torch

from glyph_engine.backends import create_backend
from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.errors import GlyphEngineError
from glyph_engine.pipeline import encode_prompts, generate
from glyph_engine.settings import GenerationSettings


def test_auto_is_torch_on_cpu(model):
    backend = create_backend("auto", model)
    assert backend.name == "torch" and backend.device.type == "cpu"


def test_unknown_backend(model):
    with pytest.raises(GlyphEngineError, match="unknown backend"):
        create_backend("tpu", model)


def test_encode_text_zeroes_padding(model):
    backend = TorchBackend(model)
    text, mask = encode_prompts(model, backend, ["metal", "a kind of fish found in the southern seas"])
    assert text.shape[:2] == mask.shape and text.shape[2] == 64
    assert mask[0].sum() < mask.shape[1]  # the short prompt is padded
    assert torch.all(text[0, mask[0] == 0] == 0)
    assert torch.all(text[0, mask[0] == 1].abs().sum(-1) > 0)


def test_denoise_shape_and_dtype(model):
    backend = TorchBackend(model)
    x = torch.randn(3, *model.image_shape)
    eps = backend.denoise(x, 999, torch.randn(3, 4, 64), torch.ones(3, 4, dtype=torch.long))
    assert eps.shape == x.shape and eps.dtype == torch.float32


@pytest.mark.gpu
def test_cuda_fp16_matches_cpu_fp32(model, ckpt_path):
    from glyph_engine.checkpoint import load_model

    cpu = generate(model, TorchBackend(model, "cpu"), ["metal"], 4, GenerationSettings(steps=20, guidance=4.0))
    gpu_model = load_model(ckpt_path)
    backend = TorchBackend(gpu_model, "cuda")
    assert backend.dtype == torch.float16
    gpu = generate(gpu_model, backend, ["metal"], 4, GenerationSettings(steps=20, guidance=4.0))
    mse = float(((cpu.images - gpu.images) ** 2).mean())
    assert 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))) > 30  # PSNR in dB
