"""Loading both checkpoint formats, converting between them, and refusing bad files."""

import io
import json
import os
import pickle
import shutil
import struct
import zipfile

import pytest
import torch

from glyph_engine.checkpoint import FORMAT, load_model, save_checkpoint
from glyph_engine.errors import GlyphEngineError
from glyph_engine.files import atomic_path


def unet_output(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *model.image_shape, generator=gen)
    text = torch.randn(2, 5, model.text_encoder.config.d_model, generator=gen)
    with torch.no_grad():
        return model.unet(x, 500, encoder_hidden_states=text, encoder_attention_mask=torch.ones(2, 5)).sample


def text_output(model):
    ids = model.tokenizer(["metal; gold", "water"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        return model.text_encoder(**ids).last_hidden_state


def test_checkpoint_equals_diffusers_folder(glyffuser_folder, t5_folder, ckpt_path):
    folder_model = load_model(glyffuser_folder, str(t5_folder))
    file_model = load_model(ckpt_path)
    assert torch.equal(unet_output(folder_model), unet_output(file_model))
    assert torch.equal(text_output(folder_model), text_output(file_model))
    assert file_model.tokenizer("metal gold")["input_ids"] == folder_model.tokenizer("metal gold")["input_ids"]
    assert file_model.pixel_range == (0.0, 1.0) and file_model.unconditional == "zeros"
    assert file_model.default_guidance == 4.0
    assert len(file_model.alphas_cumprod) == 1000
    assert file_model.sha256 != folder_model.sha256  # hashes of different files


def test_checkpoint_is_plain_data(ckpt_path):
    payload = torch.load(ckpt_path, weights_only=True)
    assert payload["format"] == FORMAT and payload["format_version"] == 1
    for key in ("unet", "text_encoder", "tokenizer", "scheduler", "pixel_range", "unconditional", "default_guidance"):
        assert key in payload
    assert json.loads(payload["scheduler"]["config"])["prediction_type"] == "epsilon"


def test_fp16_checkpoint_is_smaller_and_close(model, tmp_path, ckpt_path):
    half = tmp_path / "half.pt"
    save_checkpoint(model, half, dtype=torch.float16)
    assert half.stat().st_size < 0.6 * ckpt_path.stat().st_size
    reloaded = load_model(half)
    assert next(reloaded.unet.parameters()).dtype == torch.float32  # computed in FP32 on the CPU
    torch.testing.assert_close(unet_output(reloaded), unet_output(model), rtol=0, atol=2e-2)


def test_save_is_atomic(model, tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError):
        save_checkpoint(model, target)
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def write_bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, c: d / "missing.pt", "does not exist"),
        (lambda d, c: write_bytes(d / "trunc.pt", c.read_bytes()[: c.stat().st_size // 2]), "truncated or corrupt"),
        (lambda d, c: write_bytes(d / "text.pt", b"hello, not a checkpoint\n" * 10), "corrupt"),
        (lambda d, c: write_bytes(d / "empty.pt", b""), "corrupt"),
        (lambda d, c: write_bytes(d / "evil.pt", pickle.dumps(Evil())), "refuses to unpickle"),
        (
            lambda d, c: (torch.save({"weights": torch.zeros(2)}, d / "other.pt"), d / "other.pt")[1],
            "not a glyph-engine",
        ),
        (lambda d, c: (torch.save({"format": FORMAT, "format_version": 99}, d / "new.pt"), d / "new.pt")[1], "newer"),
        (
            lambda d, c: (torch.save({"format": FORMAT, "format_version": 1}, d / "part.pt"), d / "part.pt")[1],
            "incomplete",
        ),
        (lambda d, c: (d / "folder").mkdir() or d / "folder", "no model_index.json"),
    ],
    ids=["missing", "truncated", "text", "empty", "pickle-code", "other-torch", "future", "incomplete", "plain-folder"],
)
def test_bad_files_give_clear_errors(tmp_path, ckpt_path, make, message):
    with pytest.raises(GlyphEngineError, match=message):
        load_model(make(tmp_path, ckpt_path))


def test_evil_pickle_is_not_executed(tmp_path, capfd):
    path = write_bytes(tmp_path / "evil.pt", pickle.dumps(Evil()))
    with pytest.raises(GlyphEngineError):
        load_model(path)
    assert "pwned" not in capfd.readouterr().out


def edited_checkpoint(ckpt_path, tmp_path, edit):
    payload = torch.load(ckpt_path, weights_only=True)
    edit(payload)
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    return path


def set_config(part, **changes):
    def edit(payload):
        config = json.loads(payload[part]["config"])
        config.update(changes)
        payload[part]["config"] = json.dumps(config)

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (set_config("scheduler", prediction_type="v_prediction"), "epsilon prediction only"),
        (set_config("unet", encoder_hid_dim=128), "does not match what the U-Net expects"),
        (set_config("unet", out_channels=2), "in_channels and out_channels differ"),
        (set_config("unet", addition_embed_type="text_time"), "not supported"),
        (set_config("unet", block_out_channels=[32, 32, 64, 128]), "do not match its config"),
        (lambda p: p["unet"]["state_dict"].pop("conv_in.weight"), "do not match its config"),
        (lambda p: p.update(unconditional="learned"), "unknown unconditional"),
    ],
    ids=["v-pred", "text-width", "channels", "add-embed", "shape", "missing-weight", "uncond"],
)
def test_unsupported_or_inconsistent_configs(ckpt_path, tmp_path, edit, message):
    with pytest.raises(GlyphEngineError, match=message):
        load_and_build(edited_checkpoint(ckpt_path, tmp_path, edit))


def load_and_build(path):
    """Loads a checkpoint and builds its modules (which `load_model` defers to first use)."""
    model = load_model(path)
    return model, model.unet, model.text_encoder


def test_text_encoder_option_only_for_folders(ckpt_path):
    with pytest.raises(GlyphEngineError, match="diffusers folders only"):
        load_model(ckpt_path, "google-t5/t5-small")


def test_unreachable_hub_text_encoder(glyffuser_folder, monkeypatch):
    import huggingface_hub

    # As with HF_HUB_OFFLINE=1 in the environment (read at import, so patched here).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GlyphEngineError, match="local folder"):
        load_model(glyffuser_folder, "google-t5/t5-small")


def test_folder_without_safetensors_is_refused(glyffuser_folder, t5_folder, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(glyffuser_folder, folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(GlyphEngineError, match="does not unpickle"):
        load_model(folder, str(t5_folder))


def test_incomplete_folder(glyffuser_folder, t5_folder, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(glyffuser_folder, folder)
    shutil.rmtree(folder / "scheduler")
    with pytest.raises(GlyphEngineError, match="lacks scheduler"):
        load_model(folder, str(t5_folder))


def test_checkpoint_loads_from_bytes_round_trip(ckpt_path):
    """weights_only loading accepts every type the writer uses (bytes, str, float, lists)."""
    buffer = io.BytesIO(ckpt_path.read_bytes())
    payload = torch.load(buffer, weights_only=True)
    assert isinstance(next(iter(payload["tokenizer"]["files"].values())), bytes)


# --- damage and absurd contents ----------------------------------------------------------


def flip(path, start, count=400):
    data = bytearray(path.read_bytes())
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(data)
    return path


def largest_tensor_bytes(path):
    """(offset, size) of the largest tensor's raw bytes inside the checkpoint's zip."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)  # the local file header; its name and extra field follow
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def test_flipped_bytes_in_the_middle_are_caught(ckpt_path, tmp_path):
    copy = shutil.copy(ckpt_path, tmp_path / "flipped.pt")
    flip(copy, copy.stat().st_size // 2)
    with pytest.raises(GlyphEngineError, match="is damaged: its part .* fails its CRC-32 check"):
        load_model(copy)


def test_flipped_tensor_bytes_are_caught(ckpt_path, tmp_path):
    copy = shutil.copy(ckpt_path, tmp_path / "flipped.pt")
    offset, size = largest_tensor_bytes(copy)
    flip(copy, offset + size // 2)
    # torch.load itself reads the altered weights without complaint...
    altered = torch.load(copy, weights_only=True)["unet"]["state_dict"]
    original = torch.load(ckpt_path, weights_only=True)["unet"]["state_dict"]
    assert any(not torch.equal(altered[k], original[k]) for k in original)
    # ...so glyph-engine checks the zip's CRC-32s first.
    with pytest.raises(GlyphEngineError, match="damaged"):
        load_model(copy)


def test_the_embedded_checkpoints_pass_their_checksums():
    from glyph_engine.files import zip_damage
    from glyph_engine.model import EMBEDDED_MODELS

    assert [zip_damage(path) for path in EMBEDDED_MODELS.values()] == [None] * len(EMBEDDED_MODELS)


def test_an_embedded_model_loads_by_its_short_name_unless_a_file_has_that_name(ckpt_path, tmp_path, monkeypatch):
    from glyph_engine.model import EMBEDDED_MODELS
    from glyph_engine.session import ModelSource

    monkeypatch.chdir(tmp_path)
    for name, path in EMBEDDED_MODELS.items():
        assert ModelSource(ckpt=name).checkpoint == path
        assert load_model(name).sha256 == load_model(path).sha256
    name = next(iter(EMBEDDED_MODELS))
    shutil.copy(ckpt_path, tmp_path / name)  # a file of that name here is what the user means
    assert ModelSource(ckpt=name).checkpoint.resolve() == tmp_path / name
    assert load_model(name).sha256 == load_model(ckpt_path).sha256
    with pytest.raises(GlyphEngineError, match=f"an embedded model's name \\({name}"):
        ModelSource(ckpt="no-such-model").check()


def test_legacy_format_is_refused(ckpt_path, tmp_path):
    """PyTorch's pre-zip format has no checksums, so damage to it could not be caught."""
    path = tmp_path / "legacy.pt"
    torch.save(torch.load(ckpt_path, weights_only=True), path, _use_new_zipfile_serialization=False)
    with pytest.raises(GlyphEngineError, match="legacy"):
        load_model(path)


def set_field(key, value):
    return lambda payload: payload.update({key: value})


def set_tokenizer(**changes):
    return lambda payload: payload["tokenizer"].update(changes)


@pytest.mark.parametrize(
    "edit, message",
    [
        (set_field("pixel_range", [0.0, 0.0]), r"pixel range \[0.0, 0.0\]; it must be two finite numbers, low < high"),
        (set_field("pixel_range", [1.0, 0.0]), "low < high"),
        (set_field("pixel_range", [float("nan"), 1.0]), "low < high"),
        (set_field("pixel_range", [0.0, float("inf")]), "low < high"),
        (set_field("pixel_range", [0.0]), "incomplete"),
        (set_field("default_guidance", float("nan")), r"default guidance in .* must be a finite number .*\(got nan\)"),
        (set_field("default_guidance", 1e9), r"default guidance in .* must be a finite number from 0 to 100"),
        (set_field("guidance_interval", [20.0, 0.5]), r"guidance interval \(20.0, 0.5\); it must be"),
        (set_field("guidance_interval", [float("nan"), 1.0]), "guidance interval"),
        (set_field("guidance_interval", [1.0]), "incomplete"),
        (set_tokenizer(max_length=0), "max_length of 0"),
        (set_config("unet", sample_size=100000), "sample_size is 100000, but glyph-engine serves a whole number"),
        (set_config("unet", sample_size=[32, 0]), "sample_size is"),
        (set_config("unet", sample_size=None), "no sample_size"),
        (set_config("unet", block_out_channels=[32, 32, 64, 10**6]), "block_out_channels"),
        (set_config("unet", layers_per_block=10**6), "layers_per_block"),
        (set_config("unet", layers_per_block=2.5), "layers_per_block"),
        (set_config("unet", in_channels=True, out_channels=True), "in_channels"),
        (set_config("unet", down_block_types=["DownBlock2D"] * 9), "inconsistent"),
        (set_config("text_encoder", num_layers=10**6), "num_layers"),
        (set_config("scheduler", num_train_timesteps=10**12), "num_train_timesteps"),
        (set_tokenizer(files={}), "tokenizer in .* has no files"),
        (set_tokenizer(files=None), "tokenizer in .* has no files"),
        (set_tokenizer(files={"spiece.model": b"not a sentencepiece model"}), "tokenizer in .* cannot be loaded"),
        (set_tokenizer(files={"..": b"x"}), "not a plain file name"),
        (set_tokenizer(files={"tokenizer.json": b"{not json"}), "tokenizer in .* cannot be loaded"),
        (lambda p: p["unet"].update(config="[1, 2]"), "incomplete"),
        (lambda p: p["unet"].update(state_dict=[1, 2]), "do not match its config"),
        (set_field("metadata", 5), "incomplete"),
    ],
    ids=lambda v: None if callable(v) else v[:30],
)
def test_absurd_contents_are_refused(ckpt_path, tmp_path, edit, message):
    with pytest.raises(GlyphEngineError, match=message):
        load_and_build(edited_checkpoint(ckpt_path, tmp_path, edit))


def test_sampling_defaults_round_trip(model, tmp_path):
    from glyph_engine.checkpoint import save_checkpoint

    model.guidance_interval, model.center_noise = (0.5, float("inf")), True
    save_checkpoint(model, tmp_path / "c.pt")
    loaded = load_model(tmp_path / "c.pt")
    assert loaded.guidance_interval == (0.5, float("inf")) and loaded.center_noise


@pytest.mark.parametrize(
    "config",
    [
        {},  # DDPMScheduler's defaults: the glyffuser's schedule
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"num_train_timesteps": 500, "beta_start": 0.001, "beta_end": 0.03},
        {"beta_schedule": "squaredcos_cap_v2"},  # handed to diffusers itself
        {"rescale_betas_zero_snr": True},  # likewise
    ],
)
def test_noise_schedule_is_diffusers_own(config):
    """The schedule computed without importing diffusers equals DDPMScheduler's, bit for bit."""
    from diffusers import DDPMScheduler

    from glyph_engine.checkpoint import _alphas_cumprod

    expected = DDPMScheduler(**config).alphas_cumprod.numpy().astype("float64")
    assert (_alphas_cumprod(config) == expected).all()
