"""The PyTorch backend behind the Backend interface, on the CPU and (marked) on a GPU."""

import pytest
import torch

from glyph_engine.backends import create_backend
from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.errors import GlyphEngineError
from glyph_engine.pipeline import encode_prompts, generate
from glyph_engine.settings import GenerationSettings


def test_auto_on_cpu_is_openvino_else_torch(model, monkeypatch):
    import glyph_engine.backends

    if glyph_engine.backends.openvino_installed():
        backend = create_backend("auto", model)
        assert backend.name == "openvino" and backend.device.type == "cpu"
    monkeypatch.setattr(glyph_engine.backends, "openvino_installed", lambda: False)
    backend = create_backend("auto", model)
    assert backend.name == "torch" and backend.device.type == "cpu"


def test_unknown_backend(model):
    with pytest.raises(GlyphEngineError, match="unknown backend"):
        create_backend("tpu", model)


def test_encode_text_zeroes_padding(model):
    backend = TorchBackend(model, device="cpu")
    text, mask = encode_prompts(model, backend, ["metal", "a kind of fish found in the southern seas"])
    assert text.shape[:2] == mask.shape and text.shape[2] == 64
    assert mask[0].sum() < mask.shape[1]  # the short prompt is padded
    assert torch.all(text[0, mask[0] == 0] == 0)
    assert torch.all(text[0, mask[0] == 1].abs().sum(-1) > 0)


def test_denoise_shape_and_dtype(model):
    backend = TorchBackend(model, device="cpu")
    x = torch.randn(3, *model.image_shape)
    eps = backend.denoise(x, 999, torch.randn(3, 4, 64), torch.ones(3, 4, dtype=torch.long))
    assert eps.shape == x.shape and eps.dtype == torch.float32


def test_backend_never_changes_the_model_it_was_given(model):
    """One model serves several backends (the benchmark builds a few): a cast in place
    would leave the peer running on the other backend's dtype."""
    before = {name: (p.dtype, p.device) for name, p in model.unet.named_parameters()}
    backend = TorchBackend(model, device="cpu", dtype=torch.bfloat16)
    assert next(backend.unet.parameters()).dtype == torch.bfloat16
    assert {name: (p.dtype, p.device) for name, p in model.unet.named_parameters()} == before
    assert TorchBackend(model, device="cpu").unet is model.unet  # nothing to change: no copy


def test_denoise_takes_inputs_of_any_dtype(model):
    backend = TorchBackend(model, device="cpu")
    x, text = torch.randn(2, *model.image_shape), torch.randn(2, 4, 64)
    mask = torch.ones(2, 4, dtype=torch.long)
    reference = backend.denoise(x, 500, text, mask)
    other = backend.denoise(x.double(), 500, text.half(), mask.int())
    assert other.dtype == torch.float32 and other.device == backend.device
    torch.testing.assert_close(other, reference, rtol=0, atol=5e-3)  # text rounded to FP16


@pytest.mark.gpu
def test_cuda_backend_takes_cpu_inputs_and_returns_cuda_outputs(model):
    backend = TorchBackend(model, device="cuda")
    x, text = torch.randn(2, *model.image_shape), torch.randn(2, 4, 64)
    eps = backend.denoise(x, 500, text, torch.ones(2, 4, dtype=torch.long))
    assert eps.device.type == "cuda" and eps.dtype == torch.float16
    encoded = backend.encode_text(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
    assert encoded.device.type == "cuda"
    assert next(model.unet.parameters()).device.type == "cpu"  # the model stays where it was


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
