"""The PyTorch backend behind the Backend interface, on the CPU and (marked) on a GPU; what
each backend runs for each precision, and what auto takes on each device."""

import pytest
import torch

import glyph_engine.backend_factory as backend_factory
from glyph_engine.backend_factory import create_backend
from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.cpu import CpuInfo
from glyph_engine.errors import GlyphEngineError
from glyph_engine.model import placed
from glyph_engine.pipeline import encode_prompts, generate
from glyph_engine.precision import RUNS, choose, cpu_auto, gpu_auto
from glyph_engine.settings import BackendName, GenerationSettings, Precision


def test_auto_on_cpu_is_openvino_else_torch(model, monkeypatch):
    if backend_factory.openvino_installed():
        backend = create_backend("auto", model)
        assert backend.name == "openvino" and backend.device.type == "cpu"
    monkeypatch.setattr(backend_factory, "openvino_installed", lambda: False)
    backend = create_backend("auto", model)
    assert backend.name == "torch" and backend.device.type == "cpu"


def test_unknown_backend(model):
    with pytest.raises(GlyphEngineError, match="unknown backend"):
        create_backend("tpu", model)


AVX2, VNNI, BF16, AMX = (
    ("avx2", "fma"),
    ("avx512f", "avx512_vnni"),
    ("avx512f", "avx512_bf16"),
    ("amx_bf16", "amx_int8"),
)


@pytest.mark.parametrize(
    "flags, int8_passed, expected",
    [
        (AVX2, False, "fp32"),
        (AVX2, True, "fp32"),  # no int8 units: a passed gate does not make int8 fast
        (VNNI, False, "fp32"),
        (VNNI, True, "int8"),
        (BF16, False, "bf16"),
        (AMX, False, "bf16"),
        (AMX, True, "int8"),
    ],
)
def test_auto_on_a_cpu(flags, int8_passed, expected):
    cpu = CpuInfo("test CPU", flags, 2)
    assert cpu_auto(RUNS["openvino"]["cpu"], int8_passed, cpu).value == expected
    # Backends without bf16 or int8 on a CPU take FP32 from the same rule, on any CPU.
    for backend in ("torch", "onnxruntime"):
        assert cpu_auto(RUNS[backend]["cpu"], int8_passed, cpu) is Precision.fp32


def test_auto_on_a_gpu():
    assert gpu_auto(RUNS["torch"]["cuda"]) is Precision.fp16
    assert choose("tensorrt", "cuda", "auto") is Precision.fp16
    assert choose("onnxruntime", "cuda", "auto", available={Precision.fp16, Precision.fp32}) is Precision.fp16
    # An export without FP16 files: auto takes what the export holds rather than failing.
    assert choose("onnxruntime", "cuda", "auto", available={Precision.fp32}) is Precision.fp32


REFUSED = [
    (backend, device, precision)
    for backend, by_device in RUNS.items()
    for device, runs in by_device.items()
    for precision in Precision
    if precision is not Precision.auto and precision not in runs
]


@pytest.mark.parametrize("backend, device, precision", REFUSED)
def test_each_refusal_is_one_line_that_says_where_the_precision_runs(backend, device, precision):
    with pytest.raises(GlyphEngineError) as refused:
        choose(backend, device, precision)
    message = str(refused.value)
    assert "\n" not in message and "BackendName" not in message and "Precision." not in message
    assert message.startswith(f"--backend {backend} on a {'CPU' if device == 'cpu' else 'GPU'} runs --precision ")
    elsewhere = message.rpartition(f"{precision.value} runs")[2]
    named = {b for b in RUNS if f"--backend {b}" in elsewhere}
    assert named == {b for b, by_device in RUNS.items() if any(precision in runs for runs in by_device.values())}


def test_factory_refusals_name_options_as_users_type_them(model):
    """The refusal came from the enum's repr once ("drop --backend BackendName.torch")."""
    with pytest.raises(GlyphEngineError) as refused:
        create_backend(BackendName.torch, model, precision=Precision.bf16)
    assert str(refused.value) == (
        "--backend torch on a CPU runs --precision fp32, not bf16; bf16 runs on a CPU with --backend openvino "
        "or --backend inductor."
    )


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_torch_on_a_cpu_runs_fp32(model, precision):
    backend = create_backend("torch", model, precision=precision)
    assert backend.device.type == "cpu" and backend.precision == "fp32"
    assert next(backend.unet.parameters()).dtype == torch.float32


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8"])
def test_torch_on_a_cpu_refuses_what_it_does_not_run(model, precision):
    with pytest.raises(GlyphEngineError, match=f"--backend torch on a CPU runs --precision fp32, not {precision}"):
        TorchBackend(model, device="cpu", precision=precision)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "precision, ran, dtype",
    [("auto", "fp16", torch.float16), ("fp16", "fp16", torch.float16), ("fp32", "fp32", torch.float32)],
)
def test_torch_on_a_gpu_runs_the_precision_asked(model, precision, ran, dtype):
    """--precision fp16, what a GPU runs by default, was refused (as if only OpenVINO ran it)."""
    backend = create_backend("torch", model, precision=precision)
    assert backend.device.type == "cuda" and backend.precision == ran
    assert next(backend.unet.parameters()).dtype == dtype
    x, text = torch.randn(2, *model.image_shape), torch.randn(2, 4, 64)
    assert backend.denoise(x, 500, text, torch.ones(2, 4, dtype=torch.long)).dtype == dtype


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
    would leave the peer running on the other backend's dtype. (On a CPU the backend runs
    FP32 only, so the cast it makes for a GPU is checked on the CPU through `model.placed`.)"""
    before = {name: (p.dtype, p.device) for name, p in model.unet.named_parameters()}
    copy = placed(model.unet, torch.device("cpu"), torch.float16)
    assert next(copy.parameters()).dtype == torch.float16
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
