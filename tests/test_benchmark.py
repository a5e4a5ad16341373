"""`glyph-engine bench`: every output file, a plot of the measured numbers, the peer loop."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.benchmark import peer_generate, plot, unet_flops_per_image
from glyph_engine.cli import app
from glyph_engine.pipeline import generate, image_seeds
from glyph_engine.sampler import initial_noise
from glyph_engine.settings import GenerationSettings


def test_bench_cli_writes_all_outputs(ckpt_path, tmp_path):
    out = tmp_path / "results"
    result = CliRunner().invoke(
        app, ["bench", "--ckpt", str(ckpt_path), "--steps", "1,2", "--batch", "4", "-o", str(out), "--repeats", "1"]
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    points = results["points"]
    backends = {p["backend"] for p in points}
    assert {"peer", "torch"} <= backends
    assert {(p["steps"], p["batch"]) for p in points} == {(1, 4), (2, 4)}
    assert all(p["images_per_s"] > 0 and 0 < p["utilization"] < 1 for p in points)
    assert all(p["ratio_to_peer"] == 1.0 for p in points if p["backend"] == "peer")
    assert results["machine"]["cores"] >= 1 and results["machine"]["libraries"]["torch"]
    assert results["unet_flops_per_image_step"] > 1e8

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [float(r["images_per_s"]) for r in rows] == pytest.approx([p["images_per_s"] for p in points])
    table = (out / "results.md").read_text()
    assert table.startswith("Machine:") and "| peer | 4 | 1 |" in table

    image = np.asarray(Image.open(out / "throughput.png").convert("L"))
    assert image.shape[0] > 200 and image.std() > 10  # a drawn figure, not a blank


def test_plot_draws_exactly_the_measured_points(tmp_path):
    results = {
        "machine": {"cpu": "test", "cores": 2, "gpu": None},
        "points": [
            {"backend": b, "batch": 4, "steps": s, "images_per_s": v}
            for b, s, v in [("peer", 1, 10.0), ("peer", 2, 6.0), ("torch", 2, 9.0), ("torch", 1, 20.0)]
        ],
    }
    series = plot(results, tmp_path / "p.png")
    assert series == {("peer", 4): [(1, 10.0), (2, 6.0)], ("torch", 4): [(1, 20.0), (2, 9.0)]}


def test_peer_loop_draws_what_generate_draws(model):
    """Same weights, noise and steps: the peer and glyph-engine agree (so they do equal work)."""
    from diffusers import DPMSolverMultistepScheduler

    noise = initial_noise(image_seeds(0, 2), model.image_shape)
    peer = peer_generate(model, DPMSolverMultistepScheduler(), ["metal", "metal"], noise, 5)
    ours = generate(
        model, TorchBackend(model, device="cpu"), ["metal"], 2, GenerationSettings(steps=5, guidance=1.0)
    ).images
    torch.testing.assert_close(ours, peer, rtol=0, atol=1e-4)


def test_flop_count_matches_full_size_reference():
    """The full glyffuser U-Net counts about 324 GFLOP per image per step (REFERENCE.md)."""
    from diffusers import UNet2DConditionModel

    from glyph_engine.model import GLYFFUSER_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**GLYFFUSER_UNET_CONFIG)
    fake = type("M", (), {"unet": unet, "image_shape": (1, 128, 128)})()
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
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["source"] == str(glyffuser_folder)
    assert set(results["backends"]) == {"torch", "onnxruntime"}
    assert {p["backend"] for p in results["points"]} == {"peer", "torch", "onnxruntime"}
    assert "flags" in results["machine"]["cpu_features"] and results["machine"]["libraries"]["onnxruntime"]
