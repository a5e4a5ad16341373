"""The CPU default: OpenVINO compiled on first use, cached, at the precision this CPU suits.

Numerics are checked against eager PyTorch FP32; the embedded model's quality gate (U-Net
relative error on real trajectories) runs here for every precision that can run.
"""

import collections
import dataclasses
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from factories import record_builds

pytest.importorskip("openvino", reason="the CPU default needs OpenVINO (not on the GPU machines)")

import onnx  # noqa: E402
import openvino as ov  # noqa: E402 - after the skip

import glyph_engine.backend_factory  # noqa: E402 - after the skip: these import OpenVINO
import glyph_engine.openvino_build as openvino_build
import glyph_engine.precision
from glyph_engine.backend_factory import create_backend
from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.cache import ArtifactCache
from glyph_engine.checkpoint import load_model
from glyph_engine.cli import app
from glyph_engine.cpu import CpuInfo
from glyph_engine.errors import GlyphEngineError
from glyph_engine.images import to_uint8
from glyph_engine.model import DEFAULT_CHECKPOINT, EMBEDDED_MODELS
from glyph_engine.pipeline import generate
from glyph_engine.quality import GATE_PROMPTS, MAX_UNET_RELATIVE_ERROR, relative_errors, torch_unet, trajectory_calls
from glyph_engine.settings import GenerationSettings, Precision

runner = CliRunner()


@pytest.fixture
def build_count(monkeypatch):
    """What each cache miss built: "model" (the T5 encoder), "graph" (the U-Net traced from
    PyTorch), or (precision, rows, text length) for a U-Net compiled for one input size. One
    stream, so that a call's rows are one request's, on every machine."""
    monkeypatch.setattr(openvino_build, "unet_streams", lambda precision: 1)
    calls = record_builds(monkeypatch, openvino_build, lambda core, model, progress: "model")
    record_builds(
        monkeypatch, openvino_build, lambda model, precision, progress: "graph", builder="_build_graph", calls=calls
    )
    return record_builds(
        monkeypatch,
        openvino_build,
        lambda core, graph, precision, size, streams: (precision.value, *size),
        builder="_compile_sized",
        calls=calls,
    )


def fake_cpu(monkeypatch, *flags):
    info = CpuInfo("test CPU", tuple(flags), 2)
    for module in (glyph_engine.precision, glyph_engine.backend_factory, openvino_build):
        monkeypatch.setattr(module, "cpu_info", lambda: info)


@pytest.mark.parametrize("split, streams", [(1, 1), (2, 2), (2, 1)])
def test_matches_pytorch_fp32(model, tmp_path, monkeypatch, split, streams):
    """A round's rows as `split` requests, `streams` at a time (bf16 runs two; here in fp32,
    so that the comparison with PyTorch is tight)."""
    monkeypatch.setattr(openvino_build, "unet_split", lambda precision: split)
    monkeypatch.setattr(openvino_build, "unet_streams", lambda precision: streams)
    backend = create_backend("openvino", model, precision="fp32", cache=ArtifactCache(tmp_path))
    assert backend.precision == "fp32"
    assert_matches_pytorch(model, backend)
    # Three rows: split in two, two requests of two rows, the last row's copy dropped.
    ids = torch.tensor([[5, 9, 3], [7, 1, 0], [4, 1, 0]])
    mask = (ids != 0).long()
    text = backend.encode_text(ids, mask)
    x = torch.randn(3, *model.image_shape, generator=torch.Generator().manual_seed(1))
    reference = TorchBackend(model, device="cpu").denoise(x, 300, text, mask)
    torch.testing.assert_close(backend.denoise(x, 300, text, mask), reference, atol=1e-4, rtol=1e-3)
    held = list(backend._unets.values())
    assert held and all(len(requests) == streams for requests in held)


def test_first_run_builds_later_runs_read(model, tmp_path, build_count):
    cache = ArtifactCache(tmp_path)
    images = []
    for _ in range(2):
        backend = create_backend("openvino", model, precision="fp32", cache=cache)
        images.append(generate(model, backend, ["metal"], 2, GenerationSettings(steps=3, guidance=1.0)).images)
    length = model.prompt_tokenizer(["metal"])[1].shape[1]
    assert build_count == ["model", "graph", ("fp32", 2, length)]  # the second start compiled nothing
    torch.testing.assert_close(images[0], images[1], atol=0, rtol=0)


def test_the_unet_is_compiled_for_each_input_size_it_meets(model, tmp_path, build_count):
    """A guided step runs [unconditional; conditional] rows, the others the conditional alone:
    two sizes, each compiled once and run at exactly that size."""
    backend = create_backend("openvino", model, precision="fp32", cache=ArtifactCache(tmp_path))
    settings = GenerationSettings(steps=4, guidance=3.0, guidance_interval=(0.0, 5.0))
    generate(model, backend, ["metal", "water"], 3, settings)
    length = model.prompt_tokenizer(["metal", "water"])[1].shape[1]
    assert sorted(build_count[2:]) == [("fp32", 6, length), ("fp32", 12, length)]
    assert build_count[:2] == ["model", "graph"]
    from glyph_engine.backends.openvino import compile_config

    # Imported as the backend imports it: OpenVINO's own default precision is bf16 wherever its
    # CPUID sees BF16 units, even with the kernels capped below them (`--cpu-kind avx2`).
    compiled = ov.Core().import_model(
        (
            tmp_path / openvino_build.sized_key(model, Precision.fp32, (6, length), 1).name / openvino_build.UNET
        ).read_bytes(),
        "CPU",
        compile_config(Precision.fp32),
    )
    expected = {
        "sample": [6, *model.image_shape],
        "timestep": [6],
        "encoder_hidden_states": [6, length, model.text_encoder.config.d_model],
        "encoder_attention_mask": [6, length],
    }
    shapes = {(i.get_names() & expected.keys()).pop(): list(i.get_partial_shape().to_shape()) for i in compiled.inputs}
    assert shapes == expected


def test_a_warm_start_reads_the_graph_only_to_compile_a_new_size(model, tmp_path, build_count):
    """The U-Net's graph (18 MB for the embedded model, hashed on every read) is its own entry:
    a start that meets only compiled sizes never reads it; a new size reads it, and rebuilds it
    when it is gone."""
    cache = ArtifactCache(tmp_path)
    settings = GenerationSettings(steps=2, guidance=1.0)
    generate(model, create_backend("openvino", model, precision="fp32", cache=cache), ["metal"], 2, settings)
    shutil.rmtree(tmp_path / openvino_build.graph_key(model, Precision.fp32).name)
    generate(model, create_backend("openvino", model, precision="fp32", cache=cache), ["metal"], 2, settings)
    length = model.prompt_tokenizer(["metal"])[1].shape[1]
    assert build_count == ["model", "graph", ("fp32", 2, length)]
    generate(model, create_backend("openvino", model, precision="fp32", cache=cache), ["metal"], 3, settings)
    assert build_count[3:] == ["graph", ("fp32", 3, length)]


def onnx_ops(graph: bytes) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load_from_string(graph).graph.node)


@pytest.mark.parametrize(
    ("precision", "form", "reduction"), [("fp32", "sums", "ReduceSum"), ("bf16", "centred", "ReduceMean")]
)
def test_graph_has_group_norm_without_a_reshape(model, precision, form, reduction):
    """fp32's and bf16's graphs have no GroupNorm reshaped into groups (so OpenVINO keeps the
    convolutions' channels-last layout through it): fp32's as per-channel sums, bf16's centred
    (the sums cancel in bf16); int8's keeps torch's GroupNorm (NNCF would quantize the rest)."""
    precision = Precision(precision)
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in model.unet.modules())
    graph = openvino_build._build_graph(model, precision, progress=False)
    assert graph.meta["group_norm"] == form
    ops = onnx_ops(graph.files[openvino_build.UNET_GRAPH])
    assert ops["InstanceNormalization"] == 0 and ops[reduction] >= 2 * norms, ops
    forms = (Precision.fp32, Precision.bf16, Precision.int8)
    assert len({openvino_build.graph_key(model, p) for p in forms}) == 3  # one graph entry per form
    int8 = openvino_build._build_graph(model, Precision.int8, progress=False)
    assert onnx_ops(int8.files[openvino_build.UNET_GRAPH])["InstanceNormalization"] == norms
    assert int8.meta["group_norm"] == "torch"


@pytest.mark.parametrize(("precision", "form"), [("fp32", "sums"), ("bf16", "centred")])
def test_backend_runs_the_graph_of_its_precisions_form(model, tmp_path, cpu_flags, precision, form):
    if precision == "bf16" and "avx512f" not in cpu_flags:
        pytest.skip("OpenVINO has no bf16 kernels below AVX-512")
    cache = ArtifactCache(tmp_path)
    create_backend("openvino", model, precision=precision, cache=cache)
    key = openvino_build.graph_key(model, Precision(precision))
    assert cache.get(key, lambda: pytest.fail(f"{precision} built no graph")).meta["group_norm"] == form


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_group_norm_stays_torchs_where_a_rewrite_would_stray(model, precision):
    """A model whose groups sit far from zero (mean 300 standard deviations out, through
    conv_in's bias) loses precision in the sums' E[x^2] - E[x]^2 (fp32) and in bf16's rounding
    of x before its mean is taken away (centred): both graphs keep torch's GroupNorm."""
    precision = Precision(precision)
    assert openvino_build._build_graph(model, precision, progress=False).meta["group_norm"] != "torch"
    with torch.no_grad():
        model.unet.conv_in.bias += 300
    assert openvino_build._build_graph(model, precision, progress=False).meta["group_norm"] == "torch"


def test_centred_form_is_refused_on_how_far_a_group_sits_not_only_on_fp32_error(model, monkeypatch):
    """The centred form agrees with torch's in FP32 however far out the groups sit, so bf16's
    fallback rests on the groups' measured distance from zero."""
    assert openvino_build._build_graph(model, Precision.bf16, progress=False).meta["group_norm"] == "centred"
    monkeypatch.setattr(openvino_build, "CENTRED_MAX_MEAN", 0.1)
    assert openvino_build._build_graph(model, Precision.bf16, progress=False).meta["group_norm"] == "torch"
    assert openvino_build._build_graph(model, Precision.fp32, progress=False).meta["group_norm"] == "sums"


def test_sizes_beyond_those_kept_leave_the_cache(model, tmp_path, build_count, monkeypatch):
    monkeypatch.setattr(openvino_build, "KEPT_SIZES", 2)
    backend = create_backend("openvino", model, precision="fp32", cache=ArtifactCache(tmp_path))
    mask = torch.ones(1, 3, dtype=torch.long)
    text = backend.encode_text(torch.tensor([[5, 9, 1]]), mask)
    for rows in (1, 2, 3):
        x = torch.randn(rows, *model.image_shape)
        backend.denoise(x, 500, text.expand(rows, -1, -1), mask.expand(rows, -1))
    sized = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(openvino_build.SIZED_KIND))
    kept = [openvino_build.sized_key(model, Precision.fp32, (rows, 3), 1).name for rows in (2, 3)]
    assert sized == sorted(kept) and len(build_count) == 5


@pytest.mark.slow  # about 12 s (two OpenVINO builds); the cache's damage handling is unit-tested in test_cache
def test_damaged_entry_is_rebuilt(model, tmp_path, build_count, caplog):
    cache = ArtifactCache(tmp_path)
    assert_matches_pytorch(model, create_backend("openvino", model, precision="fp32", cache=cache))
    for entry, name in (
        (openvino_build.artifact_key(model, Precision.fp32), openvino_build.TEXT_ENCODER),
        (openvino_build.sized_key(model, Precision.fp32, (2, 4), 1), openvino_build.UNET),
    ):
        blob = tmp_path / entry.name / name
        data = bytearray(blob.read_bytes())
        data[len(data) // 3] ^= 0x55
        blob.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        backend = create_backend("openvino", model, precision="fp32", cache=cache)
        assert_matches_pytorch(model, backend)
    damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    # The graph was not damaged: the T5 encoder is rebuilt, the size compiled again from it.
    assert build_count == ["model", "graph", ("fp32", 2, 4), "model", ("fp32", 2, 4)] and len(damaged) == 2, damaged


def assert_matches_pytorch(model, backend):
    reference = TorchBackend(model, device="cpu")
    ids = torch.tensor([[5, 9, 3, 1], [7, 1, 0, 0]])
    mask = (ids != 0).long()
    text = backend.encode_text(ids, mask)
    torch.testing.assert_close(text, reference.encode_text(ids, mask), atol=1e-4, rtol=1e-4)
    x = torch.randn(2, *model.image_shape, generator=torch.Generator().manual_seed(0))
    eps = backend.denoise(x, 500, text, mask)
    assert eps.dtype == torch.float32
    torch.testing.assert_close(eps, reference.denoise(x, 500, text, mask), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
    "flags, expected",
    [((), "fp32"), (("avx2", "fma"), "fp32"), (("avx512f", "avx512_bf16"), "bf16"), (("amx_bf16",), "bf16")],
)
def test_auto_precision_follows_the_cpu(model, artifact_cache, monkeypatch, flags, expected):
    # The choice only: real builds in each precision are tested above and in the quality gate.
    fake_cpu(monkeypatch, *flags)
    opened = []
    monkeypatch.setattr(openvino_build, "open_openvino", lambda m, c, p, progress: opened.append(p) or (None, []))
    create_backend("auto", model, cache=ArtifactCache(artifact_cache))
    assert [p.value for p in opened] == [expected]


def test_auto_takes_int8_only_where_it_passed_the_gate(model, tmp_path, monkeypatch):
    fake_cpu(monkeypatch, "avx512f", "avx512_vnni")
    opened = []
    monkeypatch.setattr(openvino_build, "open_openvino", lambda m, c, p, progress: opened.append(p) or (None, []))
    for gate, expected in [(None, "fp32"), ({"passed": False}, "fp32"), ({"passed": True}, "int8")]:
        monkeypatch.setattr(openvino_build, "int8_gate", lambda model, cache, gate=gate: gate)
        create_backend("auto", model, cache=ArtifactCache(tmp_path))
        assert opened.pop().value == expected
    fake_cpu(monkeypatch, "avx2")  # no int8 units: a passed gate does not make int8 fast
    create_backend("auto", model, cache=ArtifactCache(tmp_path))
    assert opened.pop().value == "fp32"


@pytest.mark.slow  # about 15-40 s: in `make test-slow`, which CI runs too
def test_int8_failing_the_gate_is_refused_and_remembered(model, tmp_path, monkeypatch):
    """The tiny random test model cannot keep 1% in int8: the build measures that, keeps the
    verdict, and refuses (later runs refuse without quantizing again). Fewer trajectories
    than a real build, to keep the test short."""
    monkeypatch.setattr(openvino_build, "CALIBRATION_PROMPTS", ("tree", "fish"))
    monkeypatch.setattr(openvino_build, "GATE_PROMPTS", ("metal",))
    cache = ArtifactCache(tmp_path)
    with pytest.raises(GlyphEngineError, match="quality gate"):
        create_backend("openvino", model, precision="int8", cache=cache)
    gate = openvino_build.int8_gate(model, cache)
    assert gate is not None and not gate["passed"] and gate["max_relative_error"] > MAX_UNET_RELATIVE_ERROR
    monkeypatch.setattr(openvino_build, "_build_int8", lambda *a: pytest.fail("quantized again"))
    with pytest.raises(GlyphEngineError, match="quality gate"):
        create_backend("openvino", model, precision="int8", cache=cache)


def test_precision_needs_the_openvino_backend(model):
    with pytest.raises(GlyphEngineError, match="bf16 runs on a CPU with --backend openvino"):
        create_backend("torch", model, precision="bf16")


@pytest.mark.parametrize("flags", [("avx2", "fma"), ()])
def test_bf16_below_avx512_is_refused_before_anything_is_built(model, tmp_path, monkeypatch, flags):
    """OpenVINO has no bf16 kernels there: it would run f32 under the bf16 name, or fail at its
    first node with a plugin message (seen with the kernels capped at AVX2)."""
    monkeypatch.setattr(glyph_engine.backend_factory, "cpu_info", lambda: CpuInfo("AMD EPYC 7B12", flags, 2))
    monkeypatch.setattr(openvino_build, "open_openvino", lambda *a: pytest.fail("opened or built"))
    with pytest.raises(GlyphEngineError, match="OpenVINO runs bf16 only on CPUs with AVX-512, and this one has none"):
        create_backend("openvino", model, precision="bf16", cache=ArtifactCache(tmp_path))


def test_fp16_is_refused_before_anything_is_built(model, tmp_path, monkeypatch):
    """fp16 once fell through to the int8 build (calibration, quantization) before failing."""
    monkeypatch.setattr(openvino_build, "open_openvino", lambda *a: pytest.fail("opened or built"))
    with pytest.raises(GlyphEngineError) as refused:
        create_backend("openvino", model, precision="fp16", cache=ArtifactCache(tmp_path))
    assert str(refused.value).startswith("--backend openvino on a CPU runs --precision fp32, bf16 or int8, not fp16;")
    assert list(tmp_path.iterdir()) == []


def test_generate_default_is_openvino_and_records_it(tmp_path, default_precision):
    """The default on a CPU, on the embedded default model at its own defaults: OpenVINO at
    the precision this CPU kind suits (expected from the flags the test reads itself), and
    images within that precision's tolerance of eager PyTorch FP32. A fresh cache: no int8
    build to prefer."""
    png = tmp_path / "g.png"
    args = ["generate", "metal", "water", "-n", "2", "--seed", "3", "--ckpt", str(DEFAULT_CHECKPOINT)]
    result = runner.invoke(app, [*args, "-o", str(png), "--out-dir", str(tmp_path / "each")])
    assert result.exit_code == 0, result.output
    assert (Image.open(png).text["backend"], Image.open(png).text["precision"]) == ("openvino", default_precision)

    model = load_model(DEFAULT_CHECKPOINT)
    settings = GenerationSettings(seed=3)
    reference = to_uint8(generate(model, TorchBackend(model, device="cpu"), ["metal", "water"], 2, settings).images)
    ours = np.stack([np.asarray(Image.open(f)) for f in sorted((tmp_path / "each").iterdir())])
    error = np.abs(ours.astype(int) - reference.astype(int))
    if default_precision == "fp32":
        assert error.max() <= 1
    else:
        # BF16's 8-bit significands: about one grey level on average (measured 1.0, a few
        # pixels of an edge off by tens), never FP32's exact match, or BF16 did not run.
        assert 0 < error.mean() <= 3, error.mean()


@pytest.mark.parametrize("kind, expected", [("avx2,fma", "fp32"), ("avx2,fma,avx512f,avx512_vnni", "fp32")])
def test_a_masked_bf16_cpu_runs_fp32(ckpt_path, tmp_path, monkeypatch, kind, expected):
    """$GLYPH_ENGINE_CPU_FLAGS masks the BF16 units: auto takes FP32 as on those machines,
    in a cache entry of its own (the key holds the flags)."""
    monkeypatch.setenv("GLYPH_ENGINE_CPU_FLAGS", kind)
    monkeypatch.setattr(openvino_build, "unet_streams", lambda precision: 1)  # the sizes below: one request per call
    png = tmp_path / "g.png"
    cache = tmp_path / "cache"
    args = ["generate", "metal", "-n", "1", "--steps", "2", "--ckpt", str(ckpt_path), "--cache-dir", str(cache)]
    result = runner.invoke(app, [*args, "-o", str(png)])
    assert result.exit_code == 0, result.output
    assert Image.open(png).text["precision"] == expected
    model = load_model(ckpt_path)
    masked = tuple(kind.split(","))
    entries = {e.name for e in cache.iterdir() if e.name.startswith("openvino-")}
    shared = {
        dataclasses.replace(key, cpu_flags=masked).name
        for key in (
            openvino_build.artifact_key(model, Precision.fp32),
            openvino_build.graph_key(model, Precision(expected)),
        )
    }
    sized = {
        dataclasses.replace(openvino_build.sized_key(model, Precision(expected), size, 1), cpu_flags=masked).name
        for size in [(rows, length) for rows in (1, 2) for length in range(1, 8)]
    }
    assert shared <= entries and entries - shared and entries - shared <= sized


@pytest.mark.slow  # about 11 s (two OpenVINO builds): in `make test-slow`, which CI runs too
def test_cache_dir_flag_wins_over_the_environment(ckpt_path, tmp_path):
    folder = tmp_path / "flag-cache"
    args = ["generate", "metal", "-n", "1", "--steps", "2", "--ckpt", str(ckpt_path), "-o", str(tmp_path / "g.png")]
    result = runner.invoke(app, [*args, "--cache-dir", str(folder)])
    assert result.exit_code == 0, result.output
    assert any(p.name.startswith("openvino-") for p in folder.iterdir())


@pytest.fixture(scope="module", params=list(EMBEDDED_MODELS))
def embedded(request):
    model = load_model(EMBEDDED_MODELS[request.param])
    calls = trajectory_calls(model, TorchBackend(model, device="cpu"), GATE_PROMPTS, 1, seed=2)
    return model, calls


@pytest.mark.parametrize("precision, low, limit", [("fp32", 0, 1e-4), ("bf16", 1e-4, MAX_UNET_RELATIVE_ERROR)])
def test_quality_gate_unet_error_on_real_trajectories(embedded, artifact_cache, cpu_flags, precision, low, limit):
    """Each embedded model's U-Net against eager FP32 on what the sampler really feeds it (a
    student's guidance input included). bf16 runs emulated (slowly) on CPUs without BF16
    units, with the same rounding; its error must also be above FP32's, or the path ran in
    FP32 (as a blob imported without its precision hint once did)."""
    model, calls = embedded
    if precision == "bf16" and "avx512f" not in cpu_flags:
        pytest.skip("OpenVINO has no bf16 kernels below AVX-512 (refused: test_cli's test_precision_option)")
    backend = create_backend("openvino", model, precision=precision, cache=ArtifactCache(artifact_cache))
    assert backend.precision == precision

    def candidate(call):
        return backend.denoise(call.sample, call.timestep, call.text, call.mask, call.guidance)

    errors = relative_errors(candidate, torch_unet(model), calls)
    steps = GenerationSettings().resolve(model).steps  # one call per step of the model's default run
    assert len(errors) == steps and low <= max(errors) <= limit, np.round(errors, 5)


@pytest.mark.slow  # about 13 s (OpenVINO builds): in `make test-slow`, which CI runs too
def test_unwritable_cache_generates_with_one_warning(ckpt_path, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a cache inside a file can never be created
    png = tmp_path / "g.png"
    args = ["generate", "metal", "-n", "1", "--steps", "2", "--ckpt", str(ckpt_path), "-o", str(png)]
    with caplog.at_level(logging.WARNING):
        result = runner.invoke(app, [*args, "--cache-dir", str(blocker / "cache")])
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "building in memory" in warnings[0]
    assert Image.open(png).text["backend"] == "openvino"


class FakeCompiled:
    """Stands in for a compiled U-Net: each request returns `answer(inputs)` and records its rows in `fed`."""

    def __init__(self, answer=lambda feed: feed["sample"] * 2, fed=None):
        self.answer, self.fed = answer, [] if fed is None else fed

    def create_infer_request(self):
        compiled = self

        class Request:
            def start_async(self, feed):
                compiled.fed.append(feed["sample"].shape[0])
                self.result = compiled.answer(feed)

            def wait(self):
                pass

            def get_output_tensor(self, index):
                return type("Tensor", (), {"data": self.result})()

            def infer(self, feed):  # the T5 encoder's
                return [compiled.answer(feed)]

        return Request()


def test_a_backend_holds_the_last_sizes_it_used(monkeypatch):
    """Each size's U-Net is opened once while held; beyond HELD_SIZES the least recently used goes."""
    from glyph_engine.backends import openvino as backend_module

    monkeypatch.setattr(backend_module, "HELD_SIZES", 2)
    opened = []

    def unet_for(size, streams):
        opened.append(size)
        return FakeCompiled(lambda feed: np.full(feed["sample"].shape, size[0], np.float32))

    backend = backend_module.OpenVINOBackend(unet_for, FakeCompiled(), Precision.fp32)
    text, mask = torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.long)
    for rows in (1, 2, 1, 3, 1, 2):
        eps = backend.denoise(torch.zeros(rows, 1, 4, 4), 10, text.expand(rows, -1, -1), mask.expand(rows, -1))
        assert eps.shape == (rows, 1, 4, 4) and bool((eps == rows).all())  # the request of its own size ran
    assert opened == [(1, 3), (2, 3), (3, 3), (2, 3)]


def test_a_call_of_more_rows_than_one_holds_runs_in_rounds_of_one_size():
    """A guided step of 64 images (128 rows) runs as two 64-row rounds: the unguided steps'
    size, so one U-Net serves both; the rows come back in order."""
    from glyph_engine.backends import openvino as backend_module

    opened, fed = [], []
    backend = backend_module.OpenVINOBackend(
        lambda size, streams: opened.append(size) or FakeCompiled(fed=fed), FakeCompiled(), Precision.bf16
    )
    x = torch.arange(130 * 32 * 32, dtype=torch.float32).reshape(130, 1, 32, 32)
    eps = backend.denoise(x, 10, torch.zeros(130, 3, 8), torch.ones(130, 3, dtype=torch.long))
    torch.testing.assert_close(eps, x * 2, atol=0, rtol=0)
    assert fed == [64, 64, 2] and opened == [(64, 3), (2, 3)]
    small = torch.zeros(5, 1, 128, 128)  # a full-size glyffuser's images: 4 rows per round
    backend.denoise(small, 10, torch.zeros(5, 3, 8), torch.ones(5, 3, dtype=torch.long))
    assert fed[3:] == [4, 1]


def test_with_two_streams_a_round_runs_as_two_requests_of_equal_rows():
    """Each round's rows go to one request per stream, all of one size; an odd row is made up
    by a copy of the last, whose output is dropped. Rows come back in order. A round of one
    row runs as one request over all cores (a model of one stream)."""
    from glyph_engine.backends import openvino as backend_module

    opened, fed, requests = [], [], []

    def unet_for(size, streams):
        opened.append((*size, streams))
        compiled = FakeCompiled(fed=fed)
        make = compiled.create_infer_request
        compiled.create_infer_request = lambda: requests.append(make()) or requests[-1]
        return compiled

    backend = backend_module.OpenVINOBackend(unet_for, FakeCompiled(), Precision.bf16, split=2, streams=2)
    x = torch.arange(131 * 32 * 32, dtype=torch.float32).reshape(131, 1, 32, 32)
    eps = backend.denoise(x, 10, torch.zeros(131, 3, 8), torch.ones(131, 3, dtype=torch.long))
    torch.testing.assert_close(eps, x * 2, atol=0, rtol=0)
    assert fed == [32, 32, 32, 32, 2, 2] and opened == [(32, 3, 2), (2, 3, 2)] and len(requests) == 4
    one = backend.denoise(x[:1], 10, torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.long))
    torch.testing.assert_close(one, x[:1] * 2, atol=0, rtol=0)
    assert fed[6:] == [1] and opened[2:] == [(1, 3, 1)] and len(requests) == 5  # one row: one request, one stream
    two = backend.denoise(x[:2], 10, torch.zeros(2, 3, 8), torch.ones(2, 3, dtype=torch.long))
    torch.testing.assert_close(two, x[:2] * 2, atol=0, rtol=0)
    assert fed[7:] == [1, 1] and opened[3:] == [(1, 3, 2)]  # two rows: two one-row requests at once

    # One core (a Ray worker's share): the same requests, one after the other, at the same sizes.
    for seen in (fed, opened, requests):
        seen.clear()
    alone = backend_module.OpenVINOBackend(unet_for, FakeCompiled(), Precision.bf16, split=2, streams=1)
    eps = alone.denoise(x, 10, torch.zeros(131, 3, 8), torch.ones(131, 3, dtype=torch.long))
    torch.testing.assert_close(eps, x * 2, atol=0, rtol=0)
    assert fed == [32, 32, 32, 32, 2, 2] and opened == [(32, 3, 1), (2, 3, 1)] and len(requests) == 2


@pytest.mark.parametrize("threads, cores, streams", [("", 2, 2), ("", 1, 1), ("", 16, 2), ("1", 16, 1), ("4", 2, 2)])
def test_bf16_rounds_run_as_two_requests_one_per_core_this_process_may_use(monkeypatch, threads, cores, streams):
    """The split is fixed (the sizes, and so the rounding, do not depend on the cores); how
    many requests run at once does."""
    from glyph_engine.backends import openvino as backend_module

    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    monkeypatch.setattr(backend_module, "cpu_info", lambda: CpuInfo("test CPU", (), cores))
    assert backend_module.unet_split(Precision.bf16) == 2
    assert backend_module.unet_streams(Precision.bf16) == streams
    assert backend_module.unet_split(Precision.fp32) == backend_module.unet_split(Precision.int8) == 1
    assert backend_module.unet_streams(Precision.fp32) == backend_module.unet_streams(Precision.int8) == 1
    config = backend_module.compile_config(Precision.bf16, streams)
    assert config["PERFORMANCE_HINT"] == ("LATENCY" if streams == 1 else "THROUGHPUT")
    assert config.get("NUM_STREAMS", "1") == str(streams)


def test_the_requests_per_round_can_be_set_and_a_bad_setting_is_refused(monkeypatch, ckpt_path, tmp_path):
    from glyph_engine.backends import openvino as backend_module

    monkeypatch.setattr(backend_module, "cpu_info", lambda: CpuInfo("test CPU", (), 2))
    monkeypatch.setenv("GLYPH_ENGINE_UNET_REQUESTS", "1")
    assert backend_module.unet_split(Precision.bf16) == backend_module.unet_streams(Precision.bf16) == 1
    monkeypatch.setenv("GLYPH_ENGINE_UNET_REQUESTS", "4")
    assert backend_module.unet_split(Precision.fp32) == 4 and backend_module.unet_streams(Precision.fp32) == 2
    for bad in ("0", "-1", "two", "17"):
        monkeypatch.setenv("GLYPH_ENGINE_UNET_REQUESTS", bad)
        with pytest.raises(GlyphEngineError, match="GLYPH_ENGINE_UNET_REQUESTS is .* a whole number from 1 to 16"):
            backend_module.unet_split(Precision.bf16)
    args = ["generate", "metal", "-n", "1", "--steps", "1", "--ckpt", str(ckpt_path), "-o", str(tmp_path / "g.png")]
    result = runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2 and "error: $GLYPH_ENGINE_UNET_REQUESTS is '17'" in result.output
