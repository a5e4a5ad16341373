"""Training from scratch: a few steps, resume, the final checkpoint, the radical evaluation."""

import dataclasses

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from glyph_engine.checkpoint import load_model
from glyph_engine.cli import app
from glyph_engine.training.dataset import GlyphSet, save_glyph_set
from glyph_engine.training.evaluate import RadicalResult, nearest, table
from glyph_engine.training.train import STATE, TrainConfig, finish, load_state, mean_encoding, sample_captions, train

TINY = TrainConfig(
    resolution=16,
    block_out_channels=(32, 32, 32),
    text_dim=32,
    text_layers=1,
    vocab_size=150,
    batch_size=8,
    warmup_steps=2,
)


@pytest.fixture(scope="module")
def glyph_file(tmp_path_factory):
    """48 synthetic glyphs: bars whose position depends on the radical."""
    rng = np.random.default_rng(0)
    images = np.full((48, 16, 16), 255, np.uint8)
    radicals = np.array([167, 85, 75] * 16, np.int16)
    captions = np.array([["metal; gold", "water; river", "wood; tree"][i % 3] + f" {i}" for i in range(48)])
    for i, r in enumerate(radicals):
        col = {167: 2, 85: 7, 75: 12}[int(r)]
        images[i, 2:14, col : col + 2] = 0
        images[i, rng.integers(2, 14), 2:14] = 0
    path = tmp_path_factory.mktemp("data") / "glyphs.npz"
    save_glyph_set(GlyphSet(images, captions, np.arange(48, dtype=np.int32) + 0x4E00, radicals), path)
    return path


def test_train_resume_and_checkpoint(glyph_file, tmp_path):
    workdir = tmp_path / "run"
    state = train(glyph_file, workdir, TINY, max_steps=3, save_every=2, sample_every=2)
    assert state.step == 3 and (workdir / STATE).is_file()
    assert (workdir / "samples" / "step_000002.png").is_file()
    before = {k: v.clone() for k, v in state.unet.state_dict().items()}

    resumed = load_state(workdir, TINY)
    assert resumed.step == 3
    assert all(torch.equal(before[k], v) for k, v in resumed.unet.state_dict().items())
    assert resumed.ema.optimization_step == 3
    assert torch.equal(resumed.radical_head.weight, state.radical_head.weight)
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema.shadow_params, state.ema.shadow_params, strict=True))
    state = train(glyph_file, workdir, TINY, max_steps=5)
    assert state.step == 5  # continued from the saved step, not from 0
    # Each run shorter than the 50-step logging interval still records its mean loss.
    assert len(state.losses) == 2 and all(np.isfinite(state.losses))

    out = tmp_path / "glyffuser.pt"
    finish(state, out, str(out), {"steps": state.step})
    model = load_model(out)
    assert model.image_shape == (1, 16, 16) and model.default_guidance == TINY.guidance
    assert model.clamp_x0 is TINY.clamp_x0 is True
    # The checkpoint holds the moving average, and training keeps its own weights afterwards.
    names = [name for name, _ in state.unet.named_parameters()]
    shadow = dict(zip(names, state.ema.shadow_params, strict=False))
    raw = dict(state.unet.named_parameters())
    saved = dict(model.unet.named_parameters())
    name = "conv_in.weight"
    assert not torch.equal(shadow[name], raw[name].detach())
    torch.testing.assert_close(saved[name].float(), shadow[name].half().float())
    assert state.unet.training
    assert model.metadata["steps"] == "5"
    assert next(iter(torch.load(out, weights_only=True)["unet"]["state_dict"].values())).dtype == torch.float16


def test_train_refuses_other_settings_in_the_same_workdir(glyph_file, tmp_path):
    from glyph_engine.errors import GlyphEngineError

    train(glyph_file, tmp_path, TINY, max_steps=1)
    with pytest.raises(GlyphEngineError, match="other settings"):
        train(glyph_file, tmp_path, TrainConfig(resolution=16, batch_size=4), max_steps=2)


def test_train_refuses_a_dataset_of_another_resolution(glyph_file, tmp_path):
    from glyph_engine.errors import GlyphEngineError

    with pytest.raises(GlyphEngineError, match="--resolution 32"):
        train(glyph_file, tmp_path, TrainConfig(), max_steps=1)


def test_nearest_neighbours():
    train_set = np.stack([np.full((4, 4), v, np.uint8) for v in (0, 128, 255)])
    samples = np.stack([np.full((4, 4), 0.49), np.full((4, 4), 1.0)]).astype(np.float32)
    index, distance = nearest(samples, train_set, chunk=2)
    assert index.tolist() == [1, 2]
    assert distance[1] == pytest.approx(0.0, abs=1e-6)
    assert distance[0] == pytest.approx(abs(0.49 - 128 / 255), abs=1e-5)


def test_eval_table():
    text = table([RadicalResult("metal", 167, 0.25, 0.036, 0.12, 0.0), RadicalResult("fire", 86, 0.1, 0.02, 0.2, 0.05)])
    assert "| metal | 167 | 25.0% | 3.6% | 6.9x | 0.120 | 0.0% |" in text
    assert "| fire | 86 | 10.0% | 2.0% | 5.0x | 0.200 | 5.0% |" in text
    assert text.endswith("Broken samples: 2.5% of all.")


def test_train_and_eval_cli(glyph_file, tmp_path):
    runner = CliRunner()
    workdir = tmp_path / "run"
    bad = runner.invoke(app, ["train", "--data", str(glyph_file), "--workdir", str(workdir)])
    assert bad.exit_code == 2 and "--steps and/or --minutes" in bad.output
    # The CLI trains with the default (32px) configuration: this dataset is 16px.
    wrong = runner.invoke(app, ["train", "--data", str(glyph_file), "--workdir", str(workdir), "--steps", "1"])
    assert wrong.exit_code == 2 and "--resolution 32" in wrong.output
    # Going on from the embedded (32px) model: the same check, through --init.
    from glyph_engine.model import TEACHER_CHECKPOINT

    init = ["--init", str(TEACHER_CHECKPOINT), "--steps", "1"]
    wrong = runner.invoke(app, ["train", "--data", str(glyph_file), "--workdir", str(workdir), *init])
    assert wrong.exit_code == 2 and "--resolution 32" in wrong.output
    assert not workdir.exists()

    train(glyph_file, workdir, TINY, max_steps=2)
    ckpt = workdir / "glyffuser.pt"
    finish(load_state(workdir, TINY), ckpt, str(ckpt), {})
    result = runner.invoke(app, ["eval", "--data", str(glyph_file), "--ckpt", str(ckpt), "-n", "4", "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.count("\n| ") >= 8  # one row per radical prompt
    assert "Caption gain: the U-Net's loss on 48 training glyphs (t = 300 and 500)" in result.output


def test_train_goes_on_from_a_checkpoint(glyph_file, tmp_path):
    from glyph_engine.errors import GlyphEngineError

    first = train(glyph_file, tmp_path / "a", TINY, max_steps=3)
    ckpt = tmp_path / "a.pt"
    finish(first, ckpt, str(ckpt), {"steps": first.step, "train_hours": 0.01, "config": TINY.to_json()})

    state = train(glyph_file, tmp_path / "b", None, max_steps=5, init=ckpt)
    assert state.step == 5 and state.config == TINY  # counted on from the checkpoint's 3 steps
    assert state.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    assert all(p.dtype == torch.float32 and p.requires_grad for p in state.unet.parameters())
    # It trained: the weights moved away from the checkpoint's.
    start = load_model(ckpt).unet.state_dict()["conv_in.weight"]
    assert not torch.equal(state.unet.state_dict()["conv_in.weight"], start)

    with pytest.raises(GlyphEngineError, match="drop --init"):
        train(glyph_file, tmp_path / "b", None, max_steps=6, init=ckpt)
    foreign = tmp_path / "foreign.pt"
    finish(first, foreign, str(foreign), {})
    with pytest.raises(GlyphEngineError, match="not written by `glyph-engine train`"):
        train(glyph_file, tmp_path / "c", None, max_steps=6, init=foreign)
    assert not (tmp_path / "c").exists()


def test_sample_captions_keeps_or_picks_one_clause():
    captions = ["gold; metals in general, money", "water"] * 200
    rng = np.random.default_rng(0)
    assert sample_captions(captions, 0.0, rng) == captions
    picked = sample_captions(captions, 1.0, rng)
    assert set(picked[0::2]) == {"gold", "metals in general", "money"}
    assert set(picked[1::2]) == {"water"}
    kept = np.mean([c == captions[0] for c in sample_captions(captions, 0.5, rng)[0::2]])
    assert 0.35 < kept < 0.65


def test_radical_loss_teaches_the_text_encoder_the_radicals(glyph_file, tmp_path):
    """On the synthetic set the caption's first word gives the radical; the head learns it."""
    config = TrainConfig(**{**TINY.__dict__, "radical_loss": 1.0, "learning_rate": 3e-3})
    state = train(glyph_file, tmp_path, config, max_steps=40)
    captions = ["metal; gold 99", "water; river 99", "wood; tree 99"]
    tokens = state.tokenizer(captions, padding="longest", return_tensors="pt")
    with torch.no_grad():
        mask = tokens["attention_mask"]
        text = state.text_encoder(**tokens).last_hidden_state * mask.unsqueeze(-1)
        predicted = state.radical_head(mean_encoding(text, mask)).argmax(-1)
    assert predicted.tolist() == [167, 85, 75]


def test_caption_gain_is_zero_for_a_model_that_ignores_its_prompt(model):
    from glyph_engine.backends.pytorch import TorchBackend
    from glyph_engine.training.evaluate import caption_gain

    from factories import DEFINITIONS

    rng = np.random.default_rng(0)
    glyphs = GlyphSet(
        rng.integers(0, 256, (len(DEFINITIONS), 32, 32), dtype=np.uint8),
        np.array(DEFINITIONS),
        np.arange(len(DEFINITIONS), dtype=np.int32) + 0x4E00,
        np.full(len(DEFINITIONS), 85, np.int16),
    )
    unet = model.unet.float()
    # Random weights use the text.
    assert abs(caption_gain(model, TorchBackend(model, device="cpu"), glyphs, count=4).gain) > 1e-4
    # Cut both ways the text reaches the U-Net: cross-attention outputs and the pooled text embedding.
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
        unet.add_embedding.norm2.weight.zero_()
        unet.add_embedding.norm2.bias.zero_()
    assert caption_gain(model, TorchBackend(model, device="cpu"), glyphs, count=4).gain == pytest.approx(0.0, abs=1e-6)


def test_a_state_from_before_the_radical_loss_points_to_init(glyph_file, tmp_path):
    from glyph_engine.errors import GlyphEngineError

    train(glyph_file, tmp_path, TINY, max_steps=1)
    payload = torch.load(tmp_path / STATE, weights_only=True)
    del payload["radical_head"]
    torch.save(payload, tmp_path / STATE)
    with pytest.raises(GlyphEngineError, match="--init"):
        load_state(tmp_path, None)


def cli_train(*args):
    return CliRunner().invoke(app, ["train", *(str(a) for a in args)])


def assert_one_line_error(result, message):
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.strip().count("\n") == 0
    assert message in result.output and "Traceback" not in result.output


def test_a_dataset_smaller_than_one_batch_is_refused(tmp_path):
    small = tmp_path / "small.npz"
    images = np.full((10, 32, 32), 255, np.uint8)
    captions = np.array([f"metal {i}" for i in range(10)])
    save_glyph_set(GlyphSet(images, captions, np.arange(10, dtype=np.int32), np.full(10, 167, np.int16)), small)
    result = cli_train("--data", small, "--workdir", tmp_path / "run", "--steps", 1)
    assert_one_line_error(result, "has 10 glyphs, fewer than one training batch (64)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", ["--save-every", "--sample-every"])
def test_zero_save_or_sample_interval_is_refused(glyph_file, tmp_path, option):
    result = cli_train("--data", glyph_file, "--workdir", tmp_path / "run", "--steps", 1, option, 0)
    assert_one_line_error(result, f"{option} must be positive (got 0)")
    assert not (tmp_path / "run").exists()


def flip_middle(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 400] = bytes(b ^ 0xFF for b in data[middle : middle + 400])
    path.write_bytes(data)


def drop_optimizer(path):
    payload = torch.load(path, weights_only=True)
    del payload["optimizer"]
    torch.save(payload, path)


@pytest.mark.parametrize(
    "damage",
    [flip_middle, lambda p: p.write_bytes(p.read_bytes()[:5000]), drop_optimizer],
    ids=["flipped", "truncated", "incomplete"],
)
def test_a_damaged_training_state_is_refused(glyph_file, tmp_path, damage):
    workdir = tmp_path / "run"
    train(glyph_file, workdir, TINY, max_steps=1)
    damage(workdir / STATE)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    result = cli_train("--data", glyph_file, "--workdir", workdir, "--steps", 2)
    assert_one_line_error(result, f"{workdir / STATE} is damaged or incomplete")
    assert "Delete it to start this --workdir from scratch" in result.output
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_the_learning_rate_warms_up_linearly(glyph_file, tmp_path):
    """Step 0 runs at 1/warmup_steps of the rate, step warmup_steps - 1 and later at the rate."""
    from glyph_engine.training.rates import warmed_up

    config = dataclasses.replace(TINY, warmup_steps=4)
    assert [warmed_up(2.0, step, 4) for step in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    train(glyph_file, tmp_path / "run", config, max_steps=2)  # the last step taken: step 1
    saved = torch.load(tmp_path / "run" / STATE, weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(config.learning_rate * 2 / 4)


def test_init_from_a_distilled_student_is_refused_in_one_line(glyph_file, tmp_path):
    from glyph_engine.model import DEFAULT_CHECKPOINT

    workdir = tmp_path / "run"
    args = ["train", "--data", str(glyph_file), "--workdir", str(workdir), "--init", str(DEFAULT_CHECKPOINT)]
    result = CliRunner().invoke(app, [*args, "--steps", "1"])
    assert result.exit_code == 2, result.output
    assert "not written by `glyph-engine train`" in result.output and "a distilled student is not one" in result.output
    assert result.output.strip().count("\n") == 0 and not workdir.exists()
