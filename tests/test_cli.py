"""The command line, in process: every command, and every bad input, with exit codes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from glyph_engine.backends.pytorch import TorchBackend
from glyph_engine.checkpoint import load_model
from glyph_engine.cli import app
from glyph_engine.images import to_uint8
from glyph_engine.pipeline import generate, image_seeds
from glyph_engine.sampler import initial_noise
from glyph_engine.schedule import SamplerConfig
from glyph_engine.settings import GenerationSettings

from reference import glyffuser_loop

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_generate_writes_grid_and_images(ckpt_path, tmp_path, glyffuser_folder, t5_folder):
    grid_path, folder = tmp_path / "grid.png", tmp_path / "glyphs"
    result = run(
        "generate", "metal", "water", "-n", 3, "--steps", 5, "--guidance", 1, "--seed", 7,
        "--ckpt", ckpt_path, "-o", grid_path, "--out-dir", folder, "--precision", "fp32",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    grid = Image.open(grid_path)
    assert json.loads(grid.text["prompts"]) == ["metal", "water"]
    assert grid.text["model_sha256"] == load_model(ckpt_path).sha256
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == [f"{i:04d}.png" for i in range(6)]
    meta = Image.open(files[4]).text
    assert (meta["prompt"], meta["seed"], meta["steps"]) == ("water", "7", "5")

    # The PNGs hold the glyffuser loop's FP32 images, to uint8 rounding (in FP32 on every CPU:
    # the default precision is bf16 on CPUs with BF16 units, checked in test_openvino.py).
    noise = initial_noise(image_seeds(7, 6), (1, 32, 32))
    ref = glyffuser_loop(glyffuser_folder, t5_folder, ["metal"] * 3 + ["water"] * 3, noise, 5)
    ours = np.stack([np.asarray(Image.open(f)) for f in files])
    assert np.abs(ours.astype(int) - to_uint8(ref).astype(int)).max() <= 1
    assert ours.std() > 10  # not blank


@pytest.mark.slow  # about 15-40 s: in `make test-slow`, which CI runs too
def test_generate_at_the_maximum_steps(ckpt_path, tmp_path):
    """--steps 1000, the model's training timesteps and the most it takes, draws a glyph (it
    once divided by zero in the schedule and was refused as NaN). Unguided, in the FP32 entry
    other tests build: the schedule is every backend's, and 1000 calls of one row are quickest."""
    png = tmp_path / "g.png"
    args = ["generate", "metal", "-n", 1, "--steps", 1000, "--guidance", 1, "--precision", "fp32"]
    result = run(*args, "--ckpt", ckpt_path, "-o", png)
    assert result.exit_code == 0, result.output
    assert Image.open(png).text["steps"] == "1000"
    assert np.asarray(Image.open(png)).std() > 10  # not blank


def generated(tmp_path, ckpt_path, *options, name="g"):
    """The per-glyph PNGs of `generate metal -n 2 --steps 5 --seed 3` with `options`, eager FP32."""
    folder = tmp_path / name
    args = ["generate", "metal", "-n", 2, "--steps", 5, "--seed", 3, "--ckpt", ckpt_path, "--backend", "torch"]
    result = run(*args, *options, "-o", tmp_path / f"{name}.png", "--out-dir", folder)
    assert result.exit_code == 0, result.output
    files = sorted(folder.iterdir())
    return np.stack([np.asarray(Image.open(f)) for f in files]).astype(int), Image.open(files[0]).text


# Each sampling option, the settings the library must then be called with, and what the PNGs
# record of it. The tiny checkpoint guides at 4 every step, without clamping or centring.
SAMPLING_OPTIONS = {
    "spacing": (["--spacing", "leading"], {"sampler": SamplerConfig(spacing="leading")}, ("sampler", "leading")),
    "karras": (["--karras"], {"sampler": SamplerConfig(karras_sigmas=True)}, ("sampler", "karras")),
    "order": (["--order", "1"], {"sampler": SamplerConfig(order=1)}, ("sampler", "order 1")),
    "sampler": (
        ["--sampler", "dpmpp-3m"],
        {"sampler": SamplerConfig(name="dpmpp-3m")},
        ("sampler", "dpmpp-3m order 3"),
    ),
    "clamp-x0": (["--clamp-x0"], {"clamp_x0": True}, None),
    "center-noise": (["--center-noise"], {"center_noise": True}, ("center_noise", "true")),
    "guidance-interval": (
        ["--guidance-interval", "0.5", "5"],
        {"guidance_interval": (0.5, 5.0)},
        ("guidance_interval", "[0.5, 5.0]"),
    ),
}


@pytest.mark.parametrize("option", SAMPLING_OPTIONS)
def test_sampling_options_reach_the_sampler(option, ckpt_path, tmp_path, model):
    """Each option's glyphs are the library's with that setting, and not the defaults' (so an
    option the CLI dropped would fail here)."""
    args, changes, recorded = SAMPLING_OPTIONS[option]
    ours, meta = generated(tmp_path, ckpt_path, *args)
    backend = TorchBackend(model, device="cpu")
    expected = to_uint8(generate(model, backend, ["metal"], 2, GenerationSettings(steps=5, seed=3, **changes)).images)
    default = to_uint8(generate(model, backend, ["metal"], 2, GenerationSettings(steps=5, seed=3)).images)
    assert np.abs(ours - expected.astype(int)).max() <= 1
    assert np.abs(ours - default.astype(int)).max() > 8, "the option changes nothing on this model: a useless test"
    if recorded is not None:
        field, text = recorded
        assert text in meta[field]


def test_precision_option(ckpt_path, tmp_path, model, cpu_flags):
    """--precision picks the OpenVINO U-Net's precision, whatever auto would take on this CPU:
    fp32 draws eager PyTorch's glyphs; bf16 others (BF16 rounding, native or emulated), and is
    refused in one sentence below AVX-512, where OpenVINO has no bf16 kernels."""
    images = {}
    for precision in ("fp32", "bf16"):
        folder = tmp_path / precision
        args = ["generate", "metal", "-n", 2, "--steps", 5, "--seed", 3, "--ckpt", ckpt_path, "--backend", "openvino"]
        result = run(*args, "--precision", precision, "-o", tmp_path / f"{precision}.png", "--out-dir", folder)
        if precision == "bf16" and "avx512f" not in cpu_flags:
            assert result.exit_code == 2, result.output
            assert "OpenVINO runs bf16 only on CPUs with AVX-512, and this one has none" in result.output
            assert not folder.exists() or not any(folder.iterdir())
            return
        assert result.exit_code == 0, result.output
        files = sorted(folder.iterdir())
        assert Image.open(files[0]).text["precision"] == precision
        images[precision] = np.stack([np.asarray(Image.open(f)) for f in files]).astype(int)
    settings = GenerationSettings(steps=5, seed=3)
    reference = to_uint8(generate(model, TorchBackend(model, device="cpu"), ["metal"], 2, settings).images)
    assert np.abs(images["fp32"] - reference.astype(int)).max() <= 1
    assert np.abs(images["bf16"] - images["fp32"]).mean() > 1  # the random-weight model amplifies BF16 rounding


def run_on_a_terminal(*args):
    """`glyph-engine ARGS` in a subprocess whose stderr is a terminal, as a user's is; (exit code, stderr)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    command = [sys.executable, "-m", "glyph_engine", *(str(a) for a in args)]
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower) as process:
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    os.close(leader)
    return process.returncode, output.decode(errors="replace")


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_hides_progress_on_a_terminal(ckpt_path, tmp_path, quiet):
    """Progress shows only on a terminal (never in logs): there, --quiet hides it and the
    "wrote" lines; the files are written either way."""
    png = tmp_path / "g.png"
    args = ["generate", "metal", "-n", 1, "--steps", 3, "--ckpt", ckpt_path, "--backend", "torch", "-o", png]
    code, err = run_on_a_terminal(*args, *(["--quiet"] if quiet else []))
    assert code == 0, err
    assert png.is_file()
    if quiet:
        assert err.strip() == ""
    else:
        assert "sampling" in err and "3/3" in err and f"wrote {png}" in err


def test_generate_same_seed_same_files_whatever_batch_size(ckpt_path, tmp_path):
    args = ["generate", "fire", "-n", 4, "--steps", 3, "--ckpt", ckpt_path, "--seed", 5]
    assert run(*args, "-o", tmp_path / "a.png").exit_code == 0
    assert run(*args, "-o", tmp_path / "b.png", "--batch-size", 3).exit_code == 0
    a, b = (np.asarray(Image.open(tmp_path / n)).astype(int) for n in ("a.png", "b.png"))
    assert np.abs(a - b).max() <= 1


def test_generate_with_diffusers_folder(glyffuser_folder, t5_folder, tmp_path):
    result = run(
        "generate", "wood", "-n", 2, "--steps", 2, "--ckpt", glyffuser_folder,
        "--text-encoder", t5_folder, "-o", tmp_path / "g.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "g.png").size[0] > 32


def test_info(ckpt_path):
    result = run("info", ckpt_path)
    assert result.exit_code == 0, result.output
    assert "UNet2DConditionModel, 2.3M parameters" in result.output
    assert "32x32, 1 channel(s)" in result.output
    assert "[0, 1]" in result.output and "d_model 64" in result.output
    from glyph_engine.model import DEFAULT_MODEL, EMBEDDED_MODELS

    for name in EMBEDDED_MODELS:  # by the names --ckpt takes
        assert f"embedded model {name}{' (default)' if name == DEFAULT_MODEL else ''} " in result.output


def test_convert_round_trip(glyffuser_folder, t5_folder, tmp_path):
    out = tmp_path / "c.pt"
    result = run("convert", glyffuser_folder, "--text-encoder", t5_folder, "-o", out, "--fp16", "--default-guidance", 6)
    assert result.exit_code == 0, result.output
    model = load_model(out)
    assert model.default_guidance == 6.0
    assert torch.load(out, weights_only=True)["unet"]["state_dict"]["conv_in.weight"].dtype == torch.float16


@pytest.mark.parametrize("command", [[], ["generate"], ["info"], ["convert"]])
def test_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output


def corrupt(tmp_path, ckpt_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(ckpt_path.read_bytes()[:1000])
    return path


def not_a_checkpoint(tmp_path, ckpt_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, path)
    return path


def unsupported(tmp_path, ckpt_path):
    payload = torch.load(ckpt_path, weights_only=True)
    payload["scheduler"]["config"] = json.dumps({"prediction_type": "sample"})
    path = tmp_path / "sample.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["metal", "--ckpt", "{tmp}/nope.pt"], "does not exist"),
        (["metal", "--ckpt", "{corrupt}"], "truncated or corrupt"),
        (["metal", "--ckpt", "{not_a_checkpoint}"], "not a glyph-engine checkpoint"),
        (["metal", "--ckpt", "{unsupported}"], "epsilon prediction only"),
        (["", "--ckpt", "{ckpt}"], "prompt is empty"),
        (["metal", "  ", "--ckpt", "{ckpt}"], "prompt is empty"),
        (["metal", "-n", "0", "--ckpt", "{ckpt}"], "-n"),
        (["metal", "-n", "5000", "--ckpt", "{ckpt}"], "-n"),
        (["metal", "--steps", "0", "--ckpt", "{ckpt}"], "--steps"),
        (["metal", "--steps", "1001", "--ckpt", "{ckpt}"], "--steps"),
        (["metal", "--guidance", "-1", "--ckpt", "{ckpt}"], "--guidance must be a finite number from 0 to 100"),
        (["metal", "--guidance", "nan", "--ckpt", "{ckpt}"], "--guidance must be a finite number from 0 to 100"),
        (["metal", "--guidance", "100.5", "--ckpt", "{ckpt}"], "--guidance must be a finite number from 0 to 100"),
        (["metal", "--guidance", "inf", "--no-clamp-x0", "--ckpt", "{ckpt}"], "--guidance must be a finite number"),
        (["metal", "--batch-size", "0", "--ckpt", "{ckpt}"], "--batch-size"),
        (["metal", "--guidance-interval", "2", "1", "--ckpt", "{ckpt}"], "--guidance-interval must be"),
        (["metal", "--guidance-interval", "nan", "1", "--ckpt", "{ckpt}"], "--guidance-interval must be"),
        (["metal", "--seed", "-1", "--ckpt", "{ckpt}"], "--seed"),
        (["metal", "--order", "3", "--ckpt", "{ckpt}"], "--order must be from 1 to 2 for --sampler dpmpp-2m"),
        (["metal", "--sampler", "dpmpp-3m", "--order", "4", "--ckpt", "{ckpt}"], "--order must be from 1 to 3"),
        (["metal", "--sampler", "euler", "--ckpt", "{ckpt}"], "--sampler"),
        (
            ["metal", "--sampler", "dpmpp-3m", "--step-impl", "fused", "--ckpt", "{ckpt}"],
            "the fused step does not run --sampler dpmpp-3m",
        ),
        (["metal", "-n", "x", "--ckpt", "{ckpt}"], "-n"),
        (["metal", "--ckpt", "{ckpt}", "-o", "{tmp}/no/such/dir/g.png"], "does not exist"),
        (["metal", "--ckpt", "{ckpt}", "-o", "{tmp}"], "is a folder"),
        (["metal", "--ckpt", "{ckpt}", "-o", "/proc/g.png"], "cannot write"),
        (["metal", "--ckpt", "{ckpt}", "--out-dir", "{ckpt}"], "not a folder"),
        (["metal", "--ckpt", "{ckpt}", "--backend", "tpu"], "--backend"),
        (["metal", "--ckpt", "{ckpt}", "--text-encoder", "t5-small"], "diffusers folders only"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_generate_bad_input(args, message, tmp_path, ckpt_path):
    values = {
        "tmp": tmp_path,
        "ckpt": ckpt_path,
        "corrupt": corrupt(tmp_path, ckpt_path),
        "not_a_checkpoint": not_a_checkpoint(tmp_path, ckpt_path),
        "unsupported": unsupported(tmp_path, ckpt_path),
    }
    out = tmp_path / "out.png"
    full = ["generate", *(a.format(**values) for a in args)]
    if "-o" not in args:
        full += ["-o", str(out)]
    before = set(tmp_path.rglob("*"))
    result = runner.invoke(app, full)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert set(tmp_path.rglob("*")) == before  # nothing written, not even half


@pytest.mark.parametrize("option", [["-n", "0"], ["--steps", "0"], ["--guidance", "-1"]])
def test_one_line_errors(tmp_path, option):
    result = run("generate", "metal", *option, "--ckpt", tmp_path / "nope.pt")
    assert result.output.strip().count("\n") == 0
    assert result.output.startswith(f"error: {option[0]}")


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "{tmp}/nope.pt"], "does not exist"),
        (["info", "{tmp}"], "no model_index.json"),
        (["convert", "{tmp}/nope"], "not a folder"),
        (["convert", "{tmp}"], "no model_index.json"),
        (["convert", "{tmp}", "--default-guidance", "-2"], "--default-guidance"),
        # Written before and refused only when loading: the one guidance rule now refuses it here.
        (["convert", "{tmp}", "--default-guidance", "inf"], "--default-guidance must be a finite number"),
    ],
)
def test_info_and_convert_bad_input(args, message, tmp_path):
    result = run(*(a.format(tmp=tmp_path) for a in args), *(["-o", tmp_path / "c.pt"] if args[0] == "convert" else []))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "c.pt").exists()


def test_progress_bar_on_stderr(ckpt_path, tmp_path, capsys):
    from glyph_engine.commands import GenerateRequest, run_generate
    from glyph_engine.session import ModelSource
    from glyph_engine.settings import GenerationSettings

    request = GenerateRequest(
        ["metal"],
        2,
        GenerationSettings(steps=3),
        source=ModelSource(ckpt=ckpt_path),
        out=tmp_path / "g.png",
        progress=True,
    )
    run_generate(request)
    err = capsys.readouterr().err
    assert "sampling" in err and "3/3" in err


def test_version():
    from glyph_engine import __version__

    result = run("version")
    assert result.exit_code == 0 and result.output.strip() == __version__


def flipped_mid_file(tmp_path, ckpt_path):
    path = tmp_path / "flipped.pt"
    data = bytearray(ckpt_path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 400] = bytes(b ^ 0xFF for b in data[middle : middle + 400])
    path.write_bytes(data)
    return path


def edited(tmp_path, ckpt_path, edit):
    payload = torch.load(ckpt_path, weights_only=True)
    edit(payload)
    path = tmp_path / "edited.pt"
    torch.save(payload, path)  # torch.save writes fresh checksums: the edit itself is all that is wrong
    return path


def unet_config_with(**changes):
    def edit(payload):
        payload["unet"]["config"] = json.dumps({**json.loads(payload["unet"]["config"]), **changes})

    return edit


def nan_weight(payload):
    payload["unet"]["state_dict"]["conv_in.weight"][0, 0, 0, 0] = float("nan")


@pytest.mark.parametrize(
    "make, message",
    [
        (flipped_mid_file, "is damaged: its part data/"),
        (lambda t, c: edited(t, c, lambda p: p.update(pixel_range=[0.0, 0.0])), "must be two finite numbers"),
        (lambda t, c: edited(t, c, lambda p: p.update(pixel_range=[float("nan"), 1.0])), "low < high"),
        (lambda t, c: edited(t, c, unet_config_with(sample_size=100000)), "sample_size is 100000"),
        (lambda t, c: edited(t, c, unet_config_with(layers_per_block=10**6)), "layers_per_block"),
        (lambda t, c: edited(t, c, lambda p: p["tokenizer"].update(files={})), "has no files"),
        # about 12 s (an OpenVINO build of the edited model): in `make test-slow`, which CI runs too
        pytest.param(lambda t, c: edited(t, c, nan_weight), "sampling produced NaN", marks=pytest.mark.slow),
    ],
    ids=["flipped", "pixel-range-empty", "pixel-range-nan", "huge-image", "huge-depth", "no-tokenizer", "nan-weights"],
)
def test_generate_refuses_damaged_or_absurd_checkpoints(make, message, tmp_path, ckpt_path):
    ckpt = make(tmp_path, ckpt_path)
    out = tmp_path / "out.png"
    before = set(tmp_path.rglob("*"))
    result = run("generate", "metal", "-n", 2, "--steps", 2, "--ckpt", ckpt, "-o", out, "--out-dir", tmp_path / "each")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.startswith("error: ") and result.output.strip().count("\n") == 0
    assert "Traceback" not in result.output
    assert set(tmp_path.rglob("*")) == before and not out.exists()


@pytest.mark.parametrize("job", ["generate", "bulk"])
def test_a_run_resolves_its_settings_against_the_model_once(job, ckpt_path, tmp_path, monkeypatch):
    """The model's defaults are filled in one place, once per run; sampling and the PNG
    metadata read that one result (before, five checks and three re-resolutions)."""
    resolved = []
    original = GenerationSettings.resolve
    monkeypatch.setattr(
        GenerationSettings, "resolve", lambda self, model: resolved.append(self) or original(self, model)
    )
    args = ["generate", "-n", 2, "--steps", 2, "--ckpt", ckpt_path, "--backend", "torch", "--out-dir", tmp_path / "out"]
    if job == "bulk":
        (tmp_path / "prompts.txt").write_text("metal\nwood\n")
        args += ["--prompts-file", tmp_path / "prompts.txt"]
    else:
        args += ["metal", "-o", tmp_path / "grid.png"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert len(resolved) == 1
    png = Image.open(sorted((tmp_path / "out").glob("*.png"))[0])
    assert png.text["guidance"] == "4.0" and png.text["sampler"] == "dpmpp-2m order 2, linspace"
