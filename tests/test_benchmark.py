"""`glyph-engine bench`: every output file, a plot of the measured numbers, the peer loop at
the engine's guidance, each U-Net rate against the matmul peak of its own precision."""

import csv
import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import glyph_engine.benchmark as benchmark
import glyph_engine.timing as timing
from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.benchmark import (
    BenchConfig,
    BenchModel,
    markdown,
    model_labels,
    peer_model,
    plot,
    run_benchmark,
    unet_flops_per_image,
)
from glyph_engine.checkpoint import save_checkpoint
from glyph_engine.cli import app
from glyph_engine.cpu import CpuInfo
from glyph_engine.errors import GlyphEngineError
from glyph_engine.peer import Peer
from glyph_engine.pipeline import generate, image_seeds
from glyph_engine.sampler import initial_noise
from glyph_engine.settings import GenerationSettings
from glyph_engine.timing import MatmulPeak, matmul_peak
from glyph_engine.training.distill import student_unet

STUDENT_STEPS = 2  # what the test student says it was trained for


@pytest.fixture
def student_path(model, tmp_path):
    """A tiny distilled student of the test teacher: its U-Net with a guidance input."""
    student = dataclasses.replace(
        model,
        unet_source=student_unet(model.unet, seed=0).eval(),
        guidance_embedding=True,
        default_steps=STUDENT_STEPS,
        default_sampler="dpmpp-2m",
        default_order=1,
    )
    path = tmp_path / "student.pt"
    save_checkpoint(student, path)
    return path


@pytest.fixture
def no_clock(monkeypatch):
    """Every timed call runs once and takes 0.5 s; every peak is 1 TFLOP/s: nothing is timed."""
    monkeypatch.setattr(benchmark, "median_seconds", lambda fn, repeats, warmup, device: (fn(), 0.5)[1])
    monkeypatch.setattr(benchmark, "matmul_peak", lambda device, precision: MatmulPeak(device, precision, 1e12, 64))


def test_bench_cli_writes_all_outputs(ckpt_path, tmp_path):
    out = tmp_path / "results"
    args = ["bench", "--ckpt", str(ckpt_path), "--steps", "1,2", "--batch", "4", "-o", str(out), "--repeats", "1"]
    result = CliRunner().invoke(app, [*args, "--no-fixed-cost"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    points = results["points"]
    backends = {p["backend"] for p in points}
    assert {"peer", "torch"} <= backends
    assert {(p["steps"], p["batch"]) for p in points} == {(1, 4), (2, 4)}
    assert all(p["images_per_s"] > 0 and p["guidance"] == 1.0 and p["sampler"] for p in points)
    assert all(p["ratio_to_peer"] == 1.0 for p in points if p["backend"] == "peer")
    # Each row against the peak measured in its own precision, on its device, in this run.
    peaks = {(p["device"], p["precision"]): p["flops_per_s"] for p in results["matmul_peaks"]}
    ran = {"peer": results["peer"], **results["backends"]}
    assert {(b["device"], b["precision"]) for b in ran.values()} == set(peaks)
    for p in points:
        assert p["precision"] == ran[p["backend"]]["precision"]
        peak = peaks[p["device"], p["precision"]]
        if peak is None:
            assert p["utilization"] is None
        else:
            assert p["utilization"] == pytest.approx(p["unet_flops_per_s"] / peak) and 0 < p["utilization"] < 1
    assert results["machine"]["cores"] >= 1 and results["machine"]["libraries"]["torch"]
    assert [m["label"] for m in results["models"]] == ["ckpt"] and results["peer"]["model"] == "ckpt"
    assert results["models"][0]["unet_flops_per_image_step"] > 1e8 and results["models"][0]["default_steps"] is None

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [float(r["images_per_s"]) for r in rows] == pytest.approx([p["images_per_s"] for p in points])
    table = (out / "results.md").read_text()
    assert table.startswith("Machine:") and "| ckpt | peer | fp32 | dpmpp-2m | diffusers | 4 | 1 |" in table

    image = np.asarray(Image.open(out / "throughput.png").convert("L"))
    assert image.shape[0] > 200 and image.std() > 10  # a drawn figure, not a blank

    assert "startup" not in results and "Fixed cost" not in table


@pytest.mark.slow  # whole generate processes, one of them compiling: half a minute
def test_bench_reports_the_fixed_cost_of_a_process_apart(ckpt_path, tmp_path):
    """By default: warm and cold `generate` processes of the benched model against the bare imports."""
    out = tmp_path / "results"
    args = ["bench", "--ckpt", str(ckpt_path), "--backends", "torch", "--steps", "1", "--batch", "1"]
    result = CliRunner().invoke(app, [*args, "--repeats", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    startup = json.loads((out / "results.json").read_text())["startup"]
    assert {k: len(v) for k, v in startup["runs_s"].items()} == {"imports": 1, "warm": 1, "cold": 1}
    assert all(v[0] > 0 for v in startup["runs_s"].values())
    assert f"--ckpt {ckpt_path}" in startup["command"] and "-n 1 --steps 1" in startup["command"]
    assert startup["warm_over_imports"] == pytest.approx(startup["median_s"]["warm"] / startup["median_s"]["imports"])
    table = (out / "results.md").read_text()
    assert "## Fixed cost per process" in table and "| cold |" in table


def test_bench_measures_a_teacher_and_its_student_side_by_side(
    ckpt_path, student_path, tmp_path, no_clock, monkeypatch
):
    """One run, two models, guidance 4: the peer once per (batch, steps) on the teacher; the
    teacher's generate doubles its rows where it guides, the student runs one pass per step
    with 4 as its U-Net input (rows counted where the backend is called)."""
    fed = set()  # (the U-Net takes guidance, what it was given)
    denoise = TorchBackend.denoise

    def recorded(self, x, timestep, text, mask, guidance=None):
        fed.add((self.embeds_guidance, guidance))
        return denoise(self, x, timestep, text, mask, guidance)

    monkeypatch.setattr(TorchBackend, "denoise", recorded)
    out = tmp_path / "results"
    args = ["bench", "--ckpt", f"{ckpt_path},{student_path}", "--backends", "torch", "--guidance", "4"]
    args += ["--no-fixed-cost"]
    result = CliRunner().invoke(app, [*args, "--steps", "1,2", "--batch", "1,2", "--repeats", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output

    results = json.loads((out / "results.json").read_text())
    models = {m["label"]: m for m in results["models"]}
    assert list(models) == ["ckpt", "student"] and results["peer"]["model"] == "ckpt"
    assert [(m["student"], m["default_steps"]) for m in models.values()] == [(False, None), (True, STUDENT_STEPS)]
    assert models["ckpt"]["sha256"] != models["student"]["sha256"]
    grid = [(b, n) for b in (1, 2) for n in (1, 2)]
    points = {(p["model"], p["backend"], p["batch"], p["steps"]): p for p in results["points"]}
    assert len(points) == len(results["points"]) == 3 * len(grid)  # each point once
    assert set(points) == {
        (m, b, *g) for m, b in [("ckpt", "peer"), ("ckpt", "torch"), ("student", "torch")] for g in grid
    }
    for batch, steps in grid:
        assert points["ckpt", "peer", batch, steps]["unet_rows"] == 2 * batch * steps
        assert points["student", "torch", batch, steps]["unet_rows"] == batch * steps  # one pass per step
        assert points["ckpt", "torch", batch, steps]["unet_rows"] > batch * steps  # guided: doubled
    assert fed == {(False, None), (True, 4.0)}  # the teacher gets no input, the student the scale
    assert {u["model"] for u in results["unet_only"]} == {"ckpt", "student"}

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["model"] for r in rows] == [p["model"] for p in results["points"]]
    table = (out / "results.md").read_text()
    assert "| student | torch | fp32 | dpmpp-2m |" in table and f"student, trained for {STUDENT_STEPS} steps" in table


def test_bench_of_students_alone_is_refused_in_one_line(student_path, tmp_path):
    """The peer runs only a teacher: students alone are refused before any backend starts."""
    out = tmp_path / "r"
    args = ["bench", "--ckpt", f"{student_path},{student_path}", "--backends", "torch", "--steps", "1"]
    result = CliRunner().invoke(app, [*args, "--batch", "1", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.strip().count("\n") == 0
    assert "runs only a teacher" in result.output and "--ckpt teacher.pt,student.pt" in result.output
    assert not out.exists()


def test_bench_without_ckpt_measures_the_default_student_and_its_teacher_for_the_peer():
    from glyph_engine.commands import _bench_sources
    from glyph_engine.model import DEFAULT_CHECKPOINT, TEACHER_CHECKPOINT
    from glyph_engine.session import ModelSource

    sources = _bench_sources(ModelSource(), None)
    assert [each.checkpoint for each in sources.values()] == [DEFAULT_CHECKPOINT, TEACHER_CHECKPOINT]
    models = {label: each.load_model() for label, each in sources.items()}
    assert benchmark.peer_model(models) == list(sources)[1]  # the student's teacher runs the peer


def test_models_are_labelled_uniquely_and_must_draw_one_image_size(tmp_path):
    folder = tmp_path / "glyffuser"
    folder.mkdir()
    paths = [tmp_path / "a" / "student.pt", tmp_path / "b" / "student.pt", folder, tmp_path / "student-2.pt"]
    assert model_labels(paths) == ["student", "student-2", "glyffuser", "student-2-2"]
    teacher = SimpleNamespace(image_shape=(1, 64, 64), guidance_embedding=False)
    student = SimpleNamespace(image_shape=(1, 64, 64), guidance_embedding=True)
    assert peer_model({"student": student, "teacher": teacher}) == "teacher"
    with pytest.raises(GlyphEngineError, match="draw different images"):
        peer_model({"teacher": teacher, "big": SimpleNamespace(image_shape=(1, 128, 128), guidance_embedding=True)})


def test_plot_draws_one_line_per_model_backend_sampler_and_batch(tmp_path):
    """A teacher's and its student's points on the same backend, sampler and batch are two
    lines on one plot, each exactly its measured points."""
    results = {
        "machine": {"cpu": "test", "cores": 2, "gpu": None},
        "config": {"guidance": 4.0},
        "points": [
            {"model": m, "backend": b, "precision": "fp32", "sampler": s, "batch": 4, "steps": n, "images_per_s": v}
            for m, b, s, n, v in [
                ("teacher", "peer", "dpmpp-2m", 1, 10.0),
                ("teacher", "peer", "dpmpp-2m", 2, 6.0),
                ("teacher", "torch", "dpmpp-3m", 2, 8.0),
                ("teacher", "torch", "dpmpp-2m", 2, 9.0),
                ("teacher", "torch", "dpmpp-2m", 1, 20.0),
                ("student", "torch", "dpmpp-2m", 2, 18.0),
                ("student", "torch", "dpmpp-2m", 1, 40.0),
            ]
        ],
    }
    series = plot(results, tmp_path / "p.png")
    assert series == {
        ("teacher", "peer", "dpmpp-2m", 4): [(1, 10.0), (2, 6.0)],
        ("teacher", "torch", "dpmpp-3m", 4): [(2, 8.0)],
        ("teacher", "torch", "dpmpp-2m", 4): [(1, 20.0), (2, 9.0)],
        ("student", "torch", "dpmpp-2m", 4): [(1, 40.0), (2, 18.0)],
    }
    assert np.asarray(Image.open(tmp_path / "p.png").convert("L")).std() > 10


@pytest.mark.parametrize("guidance, unconditional", [(1.0, "zeros"), (4.0, "zeros"), (4.0, "empty")])
def test_peer_draws_what_generate_draws_at_the_same_guidance(model, guidance, unconditional):
    """Same weights, noise, steps and guidance (every step guided, nothing clamped or centred,
    as in the published loop): the same images, so the two do equal work. The peer runs the
    batch once per step unguided and doubled at every step guided (counted where the U-Net
    is called)."""
    model.unconditional = unconditional
    batch, steps = 2, 4
    noise = initial_noise(image_seeds(0, batch), model.image_shape)
    peer = Peer(model)
    assert peer.unet is model.unet  # the model's own modules: never moved or cast
    rows = []
    hook = peer.unet.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    images = peer.generate(["metal"] * batch, noise, steps, guidance)
    hook.remove()
    assert rows == [batch * (1 if guidance == 1.0 else 2)] * steps
    assert sum(rows) == Peer.unet_rows(batch, steps, guidance)

    settings = GenerationSettings(
        steps=steps, guidance=guidance, guidance_interval=(0.0, math.inf), clamp_x0=False, center_noise=False
    )
    ours = generate(model, TorchBackend(model, device="cpu"), ["metal"], batch, settings).images
    # Guidance amplifies float rounding, as against tests/reference.py (test_pipeline.py).
    torch.testing.assert_close(ours, images, rtol=0, atol=1e-4 if guidance == 1.0 else 5e-4)


class Relabelled:
    """A backend that reports another name and precision: the roofline follows `precision`."""

    def __init__(self, inner, name, precision):
        self.inner, self.name, self.device, self.precision = inner, name, inner.device, precision

    def encode_text(self, input_ids, attention_mask):
        return self.inner.encode_text(input_ids, attention_mask)

    def denoise(self, x, timestep, text, mask, guidance=None):
        return self.inner.denoise(x, timestep, text, mask, guidance=guidance)


def test_each_row_is_held_to_the_peak_of_its_own_precision(model, monkeypatch):
    """A bf16 backend against the bf16 peak, fp32 ones against fp32, and no figure at all for
    a precision without an honest peak; the U-Net rows each system ran are counted, the peer
    and glyph-engine at the same guidance."""
    peaks = {"fp32": 1e9, "bf16": 4e9, "int8": None}
    monkeypatch.setattr(
        benchmark, "matmul_peak", lambda device, precision: MatmulPeak(device, precision, peaks[precision], 64)
    )
    monkeypatch.setattr(benchmark, "median_seconds", lambda fn, repeats, warmup, device: (fn(), 0.5)[1])  # no clock
    backend = TorchBackend(model, device="cpu")
    backends = {precision: Relabelled(backend, precision, precision) for precision in ("bf16", "int8")}
    model.guidance_interval = (0.0, math.inf)  # glyph-engine guides every step too: rows known in advance
    config = BenchConfig(batch_sizes=(1,), steps=(2,), guidance=4.0, samplers=("dpmpp-2m", "dpmpp-3m"), repeats=1)
    assert config.samplers != BenchConfig().samplers  # the default is the default sampler alone
    results = run_benchmark([BenchModel("ckpt", model, backends)], config)

    flops = results["models"][0]["unet_flops_per_image_step"]
    points = {(p["backend"], p["sampler"]): p for p in results["points"]}
    assert set(points) == {("peer", "dpmpp-2m")} | {(b, s) for b in backends for s in config.samplers}
    for (name, _), p in points.items():
        precision = "fp32" if name == "peer" else name
        assert p["precision"] == precision and p["guidance"] == 4.0
        assert p["unet_rows"] == 1 * 2 * 2  # batch 1, 2 steps, doubled at each
        if peaks[precision] is None:
            assert p["utilization"] is None
        else:
            assert p["utilization"] == pytest.approx(flops * 4 / 0.5 / peaks[precision])
    assert points["peer", "dpmpp-2m"]["step"] == "diffusers"
    assert points["bf16", "dpmpp-3m"]["step"] == "torch"  # the fused op runs order 2 at most
    assert {(u["backend"], u["utilization"] is None) for u in results["unet_only"]} == {("bf16", False), ("int8", True)}
    assert "| ckpt | int8 | int8 | dpmpp-2m |" in markdown(results)


def test_no_peak_without_the_units_of_its_precision(monkeypatch):
    """bf16 and int8 on a CPU without their units, and fp16 on a CPU, get no peak (and nothing
    is timed): dividing by an emulated rate would flatter a backend."""
    monkeypatch.setattr(timing, "kernel_cpu", lambda: CpuInfo(model="x", flags=("avx2", "fma"), cores=2))
    monkeypatch.setattr(timing, "median_seconds", lambda *_, **__: pytest.fail("nothing should be timed"))
    for precision in ("bf16", "int8", "fp16"):
        peak = matmul_peak("cpu", precision)
        assert peak.flops_per_s is None and peak.precision == precision and peak.note


def test_an_int8_product_no_faster_than_the_floats_beside_it_is_no_int8_peak(monkeypatch):
    cpu = CpuInfo(model="x", flags=("avx512_bf16", "avx512_vnni"), cores=2)
    monkeypatch.setattr(timing, "kernel_cpu", lambda: cpu)
    rates = {torch.int8: 300e9, torch.bfloat16: 400e9}
    monkeypatch.setattr(timing, "_timed_products", lambda device, dtype, *_: rates[dtype])
    slow = matmul_peak("cpu", "int8")
    assert slow.flops_per_s is None and "bf16" in slow.note
    rates[torch.int8] = 800e9
    assert matmul_peak("cpu", "int8").flops_per_s == 800e9


def test_flop_count_matches_full_size_reference():
    """The full glyffuser U-Net counts about 324 GFLOP per image per step (REFERENCE.md)."""
    from diffusers import UNet2DConditionModel

    from glyph_engine.model import GLYFFUSER_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**GLYFFUSER_UNET_CONFIG)
    fake = type("M", (), {"unet": unet, "image_shape": (1, 128, 128), "guidance_embedding": False})()
    fake.text_encoder = type("T", (), {"config": type("C", (), {"d_model": 512})()})()
    assert unet_flops_per_image(fake) == pytest.approx(324e9, rel=0.05)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps"),
        (["--batch", "x"], "--batch"),
        (["--backends", "tpu"], "tpu"),
        # generate's limits: -n's 4096 images, and the model's 1000 training timesteps
        (["--steps", "1", "--batch", "99999999", "--backends", "torch"], "--batch must be from 1 to 4096 images"),
        (["--steps", "1,1001", "--batch", "1", "--backends", "torch"], "--steps must be at most 1000"),
    ],
)
def test_bench_bad_input(ckpt_path, tmp_path, args, message):
    result = CliRunner().invoke(app, ["bench", "--ckpt", str(ckpt_path), "-o", str(tmp_path / "r"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.startswith("error: ") and result.output.strip().count("\n") == 0
    assert not (tmp_path / "r").exists()


def test_bench_runs_a_diffusers_folder_offline_with_its_export(glyffuser_folder, t5_folder, tmp_path):
    """What users run: a glyffuser folder with a local T5, and an export folder of their choice."""
    export_dir = tmp_path / "my-export"
    made = CliRunner().invoke(
        app,
        ["export", str(glyffuser_folder), "--text-encoder", str(t5_folder), "-o", str(export_dir)]
        + ["--precision", "fp32", "--no-tensorrt"],
    )
    assert made.exit_code == 0, made.output
    out = tmp_path / "results"
    args = ["bench", "--ckpt", str(glyffuser_folder), "--text-encoder", str(t5_folder), "--export-dir", str(export_dir)]
    args += ["--backends", "torch,onnxruntime", "--steps", "1", "--batch", "2", "--repeats", "1", "-o", str(out)]
    args += ["--no-fixed-cost"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [(m["label"], m["source"]) for m in results["models"]] == [(glyffuser_folder.name, str(glyffuser_folder))]
    assert set(results["backends"]) == {"torch", "onnxruntime"}
    assert {p["backend"] for p in results["points"]} == {"peer", "torch", "onnxruntime"}
    assert "flags" in results["machine"]["cpu_features"] and results["machine"]["libraries"]["onnxruntime"]
