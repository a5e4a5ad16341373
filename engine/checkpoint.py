"""Loading glyffusers from either supported format, and writing glyph-engine checkpoints.

Two formats:
- the glyffuser's own: a diffusers folder (`model_index.json`, `unet/`, `scheduler/`) with
  the T5 encoder given separately (hub id or local folder);
- glyph-engine's single file (`ckpt.pt`): U-Net and T5 configs and weights, tokenizer files,
  training schedule, pixel range and guidance settings; everything needed offline.

Neither path executes code from the files: checkpoints go through
``torch.load(weights_only=True)`` and diffusers weights must be safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from glyph_engine.errors import GlyphEngineError
from glyph_engine.files import atomic_path, check_writable_file, sha256_file, zip_damage
from glyph_engine.model import (
    DEFAULT_TEXT_ENCODER,
    Glyffuser,
    checkpoint_path,
    embeds_guidance,
    image_shape_of,
    missing_checkpoint,
    validate_configs,
)
from glyph_engine.schedule import SamplerConfig
from glyph_engine.settings import GenerationSettings, check_guidance, valid_interval
from glyph_engine.text import PromptTokenizer

if TYPE_CHECKING:  # importing diffusers and transformers costs seconds: only on first use
    from diffusers import UNet2DConditionModel
    from transformers import PreTrainedTokenizerBase, T5EncoderModel

logger = logging.getLogger(__name__)

FORMAT = "glyph-engine-checkpoint"
FORMAT_VERSION = 1


def load_model(source: str | Path, text_encoder: str | None = None) -> Glyffuser:
    """Loads a glyffuser from a glyph-engine checkpoint file, a diffusers folder or the short
    name of an embedded model (`EMBEDDED_MODELS`)."""
    path = checkpoint_path(source)
    if not path.exists():
        raise GlyphEngineError(missing_checkpoint(path))
    if path.is_dir():
        return load_diffusers_folder(path, text_encoder or DEFAULT_TEXT_ENCODER)
    if text_encoder is not None:
        raise GlyphEngineError(
            "--text-encoder applies to diffusers folders only; a glyph-engine checkpoint carries its own T5."
        )
    return load_checkpoint(path)


def source_sha256(source: str | Path, text_encoder: str | None = None) -> str:
    """The content hash `load_model` records, computed without loading any weights.

    A checkpoint file's own sha256; for a diffusers folder, a hash over the U-Net config and
    weights, the scheduler config and the text encoder's name.
    """
    path = checkpoint_path(source)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    unet_dir = path / "unet"
    for part in (unet_dir / "config.json", path / "scheduler" / "scheduler_config.json"):
        digest.update(sha256_file(part).encode())
    for weights in sorted(unet_dir.glob("*.safetensors")):
        digest.update(sha256_file(weights).encode())
    digest.update((text_encoder or DEFAULT_TEXT_ENCODER).encode())
    return digest.hexdigest()


# --- glyph-engine checkpoint -------------------------------------------------------------


def load_checkpoint(path: Path) -> Glyffuser:
    payload = _read_payload(path)
    try:
        unet_config = _json_object(payload["unet"]["config"])
        text_config = _json_object(payload["text_encoder"]["config"])
        scheduler_config = _json_object(payload["scheduler"]["config"])
        tokenizer_files = payload["tokenizer"]["files"]
        unet_state = payload["unet"]["state_dict"]
        text_state = payload["text_encoder"]["state_dict"]
        low, high = (float(v) for v in payload["pixel_range"])
        unconditional = payload["unconditional"]
        default_guidance = float(payload["default_guidance"])
        max_length = int(payload["tokenizer"]["max_length"])
        clamp_x0 = bool(payload.get("clamp_x0", False))  # optional: absent in early v1 files
        interval = payload.get("guidance_interval")  # optional: absent before guidance intervals
        center_noise = bool(payload.get("center_noise", False))  # optional: absent before it
        guidance_interval = None if interval is None else (float(interval[0]), float(interval[1]))
        # Optional: a distilled student's own sampling defaults.
        default_steps = _optional(payload.get("default_steps"), int)
        default_sampler = _optional(payload.get("default_sampler"), str)
        default_order = _optional(payload.get("default_order"), int)
        metadata = dict(payload.get("metadata", {}))
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise GlyphEngineError(f"{path} is an incomplete glyph-engine checkpoint (bad or missing field {e}).") from None
    if unconditional not in ("zeros", "empty"):
        raise GlyphEngineError(f"{path}: unknown unconditional embedding kind {unconditional!r}.")
    _check_settings(path, (low, high), default_guidance, max_length)
    if guidance_interval is not None and not valid_interval(guidance_interval):
        raise GlyphEngineError(
            f"{path} has guidance interval {guidance_interval}; it must be two noise levels 0 <= low < high. "
            "The checkpoint is damaged or was written wrongly: re-create it."
        )
    _check_sampling_defaults(path, default_steps, default_sampler, default_order)
    validate_configs(unet_config, text_config, scheduler_config)
    # Small: checked before the big parts. The Hugging Face tokenizer (transformers) is built
    # only where something needs it; the engine tokenizes with `tokenizers` alone.
    tokenizer, prompt_tokenizer = tokenizer_sources(tokenizer_files, str(path), max_length)
    return Glyffuser(
        unet_source=lambda: _build_unet(unet_config, unet_state, path),
        text_encoder_source=lambda: _build_text_encoder(text_config, text_state, path),
        image_shape=image_shape_of(unet_config),
        tokenizer_source=tokenizer,
        prompt_tokenizer_source=prompt_tokenizer,
        scheduler_config=scheduler_config,
        alphas_cumprod=_alphas_cumprod(scheduler_config),
        source=str(path),
        sha256=sha256_file(path),
        pixel_range=(low, high),
        unconditional=unconditional,
        default_guidance=default_guidance,
        clamp_x0=clamp_x0,
        guidance_interval=guidance_interval,
        center_noise=center_noise,
        guidance_embedding=embeds_guidance(unet_config),
        default_steps=default_steps,
        default_sampler=default_sampler,
        default_order=default_order,
        max_text_length=max_length,
        metadata=metadata,
    )


def _optional(value: Any, kind: type) -> Any:
    return None if value is None else kind(value)


def _check_sampling_defaults(path: Path, steps: int | None, sampler: str | None, order: int | None) -> None:
    """A student's recorded defaults must be ones `generate` accepts (steps within the schedule
    are checked when settings are resolved against the model)."""
    try:
        GenerationSettings(
            steps=steps,
            sampler=SamplerConfig(name=sampler or SamplerConfig.name, order=order),
        ).validate()
    except GlyphEngineError as e:
        raise GlyphEngineError(
            f"{path} records sampling defaults generate cannot use ({e}) The checkpoint is damaged or was written "
            "by another version: re-create it."
        ) from None


def _json_object(text: str) -> dict[str, Any]:
    config = json.loads(text)
    if not isinstance(config, dict):
        raise TypeError(f"a config is {type(config).__name__}, not an object")
    return config


def _check_settings(path: Path, pixel_range: tuple[float, float], default_guidance: float, max_length: int) -> None:
    """Refuses sampling settings that would draw nothing sensible: images are scaled by
    1 / (high - low), and a NaN anywhere turns every pixel into NaN."""
    low, high = pixel_range
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise GlyphEngineError(
            f"{path} has pixel range [{low}, {high}]; it must be two finite numbers, low < high "
            "(glyffusers use [0, 1]). The checkpoint is damaged or was written wrongly: re-create it."
        )
    try:
        check_guidance(default_guidance, f"the default guidance in {path}")
    except GlyphEngineError as e:
        raise GlyphEngineError(f"{e} The checkpoint is damaged or was written wrongly: re-create it.") from None
    if max_length < 1:
        raise GlyphEngineError(
            f"{path} has a tokenizer max_length of {max_length}; it must be at least 1. "
            "The checkpoint is damaged or was written wrongly: re-create it."
        )


def _read_payload(path: Path) -> dict[str, Any]:
    # Checksums first: damaged bytes then never reach the unpickler. Files that are not zips
    # (a bare pickle, text) go on to torch.load, which says what they are.
    is_zip = zipfile.is_zipfile(path)
    damage = zip_damage(path) if is_zip else None
    if damage is not None:
        raise GlyphEngineError(
            f"{path} is damaged: {damage}, so its contents are not what was written. Restore it from a "
            "good copy, or re-create it (`glyph-engine convert`, or `glyph-engine train` for trained models)."
        )
    try:
        # Mapped, not read: a run on compiled models (OpenVINO) never touches the weights. Only
        # zips can be mapped; a legacy file is read, to be refused below with its own message.
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except PermissionError:
        raise GlyphEngineError(f"cannot read {path}: permission denied.") from None
    except IsADirectoryError:
        raise GlyphEngineError(f"{path} is a folder, not a checkpoint file.") from None
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise GlyphEngineError(
                f"{path} holds Python objects other than tensors and plain data; glyph-engine refuses to "
                "unpickle them (it never executes code from a checkpoint)."
            ) from None
        raise GlyphEngineError(f"{path} is not a PyTorch checkpoint, or it is corrupt ({e}).") from None
    except Exception as e:  # noqa: BLE001 - arbitrary bytes make the unpickler raise anything
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GlyphEngineError(f"{path} is truncated or corrupt and cannot be read ({reason}).") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise GlyphEngineError(
            f"{path} is a PyTorch file but not a glyph-engine checkpoint; make one from a glyffuser "
            "diffusers folder with `glyph-engine convert FOLDER -o ckpt.pt`."
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise GlyphEngineError(
            f"{path} has checkpoint format version {version!r}, newer than this glyph-engine reads "
            f"({FORMAT_VERSION}); upgrade glyph-engine."
        )
    if not is_zip:
        raise GlyphEngineError(
            f"{path} is in PyTorch's legacy (pre-1.6) file format, which has no checksums to detect damage; "
            "re-save it with a current torch.save (`torch.save(torch.load(path), path)`)."
        )
    return payload


def save_checkpoint(model: Glyffuser, path: str | Path, dtype: torch.dtype | None = None) -> str:
    """Writes `model` as a single-file checkpoint (atomically); returns its sha256.

    `dtype` (e.g. torch.float16) casts floating-point weights to halve the file; loading
    casts them back to float32 for CPU inference.
    """

    def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        state = module.state_dict()
        if dtype is None:
            return {k: v.detach().clone() for k, v in state.items()}
        return {k: v.detach().to(dtype) if v.is_floating_point() else v.detach().clone() for k, v in state.items()}

    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "unet": {"config": json.dumps(_plain_config(model.unet.config)), "state_dict": weights(model.unet)},
        "text_encoder": {
            "config": json.dumps(model.text_encoder.config.to_dict()),
            "state_dict": weights(model.text_encoder),
        },
        "tokenizer": {"files": tokenizer_files(model.tokenizer), "max_length": model.max_text_length},
        "scheduler": {"config": json.dumps(model.scheduler_config)},
        "pixel_range": list(model.pixel_range),
        "unconditional": model.unconditional,
        "default_guidance": float(model.default_guidance),
        "clamp_x0": bool(model.clamp_x0),
        "guidance_interval": None if model.guidance_interval is None else [float(v) for v in model.guidance_interval],
        "center_noise": bool(model.center_noise),
        "default_steps": model.default_steps,
        "default_sampler": model.default_sampler,
        "default_order": model.default_order,
        "metadata": dict(model.metadata),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return sha256_file(path)


def _plain_config(config: Any) -> dict[str, Any]:
    """A diffusers config as JSON-safe data; private keys (source paths, versions) dropped."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def _check_tokenizer_files(files: Any, where: str) -> dict[str, bytes]:
    if not isinstance(files, dict) or not files:
        raise GlyphEngineError(
            f"the tokenizer in {where} has no files; the file is damaged or was written wrongly: re-create it."
        )
    for name, data in files.items():
        plain = isinstance(name, str) and name not in ("", "..") and Path(name).name == name
        if not plain or not isinstance(data, bytes):
            raise GlyphEngineError(
                f"tokenizer file name {name!r} in {where} is not a plain file name with bytes; "
                "the file is damaged or was written wrongly: re-create it."
            )
    return files


@contextmanager
def _unloadable_tokenizer(where: str) -> Iterator[None]:
    try:
        yield
    except Exception as e:  # noqa: BLE001 - transformers, tokenizers and sentencepiece raise many types on bad files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GlyphEngineError(
            f"the tokenizer in {where} cannot be loaded ({reason}); the file is damaged or was written "
            "wrongly: re-create it."
        ) from None


def tokenizer_from_files(files: Any, where: str) -> PreTrainedTokenizerBase:
    """The Hugging Face tokenizer `tokenizer_files` stored (in the checkpoint or training state `where`)."""
    return _hugging_face_tokenizer(_check_tokenizer_files(files, where), where)


def tokenizer_sources(
    files: Any, where: str, max_length: int
) -> tuple[PreTrainedTokenizerBase | Callable[[], PreTrainedTokenizerBase], PromptTokenizer | None]:
    """The Hugging Face tokenizer (or a function that builds it) and the engine's tokenizer
    for `Glyffuser.tokenizer_source` / `prompt_tokenizer_source`. Files with a tokenizer.json
    (every fast tokenizer saves one) give the engine's tokenizer from `tokenizers` alone and
    leave transformers for first use; a slow tokenizer's files need transformers now, built
    once, and the engine's tokenizer is made from it on first use."""
    files = _check_tokenizer_files(files, where)
    with _unloadable_tokenizer(where):
        fast = PromptTokenizer.from_files(files, max_length)
    if fast is None:
        return _hugging_face_tokenizer(files, where), None
    return (lambda: _hugging_face_tokenizer(files, where)), fast


def _hugging_face_tokenizer(files: dict[str, bytes], where: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp, _unloadable_tokenizer(where):
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp)


def _build_unet(config: dict[str, Any], state: dict[str, torch.Tensor], path: Path) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    # Built on the meta device and filled by assignment: skips random initialisation, which
    # costs seconds for the full-size U-Net.
    with torch.device("meta"), _inconsistent_config(path, "U-Net"):
        unet = UNet2DConditionModel.from_config(config)
    _assign(unet, state, path, "U-Net")
    return unet.float().eval()


def _build_text_encoder(config: dict[str, Any], state: dict[str, torch.Tensor], path: Path) -> T5EncoderModel:
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"), _inconsistent_config(path, "text encoder"):
        encoder = T5EncoderModel(T5Config.from_dict(config))
    _assign(encoder, state, path, "text encoder")
    encoder.tie_weights()
    return encoder.float().eval()


@contextmanager
def _inconsistent_config(path: Path, what: str) -> Iterator[None]:
    """diffusers and transformers check a config's consistency (e.g. as many block types as
    block widths) by raising while they build the model."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GlyphEngineError(
            f"the {what} config in {path} is inconsistent ({reason}); the file is damaged or not a glyffuser."
        ) from None


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, TypeError) as e:  # TypeError: not a dict of tensors at all
        detail = " ".join(str(e).split())[:300]
        raise GlyphEngineError(f"the {what} weights in {path} do not match its config ({detail}).") from None
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise GlyphEngineError(f"the {what} in {path} lacks weights for {', '.join(left[:5])}.")


# The schedules computed here as diffusers' DDPMScheduler computes them (tests compare the
# two): importing diffusers costs seconds, most of a warm start. Other configs go to diffusers.
_PLAIN_BETAS = {
    "linear": lambda start, end, n: torch.linspace(start, end, n, dtype=torch.float32),
    "scaled_linear": lambda start, end, n: torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2,
}
_DDPM_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


def _alphas_cumprod(scheduler_config: dict[str, Any]) -> np.ndarray:
    # diffusers' training scheduler defines the schedule (float32, as the glyffuser
    # pipeline's sampler sees it); the solver math then runs in float64.
    config = {**_DDPM_DEFAULTS, **{k: v for k, v in scheduler_config.items() if not k.startswith("_")}}
    plain = config["beta_schedule"] in _PLAIN_BETAS and config.get("trained_betas") is None
    if plain and not config.get("rescale_betas_zero_snr", False):
        betas = _PLAIN_BETAS[config["beta_schedule"]](
            config["beta_start"], config["beta_end"], int(config["num_train_timesteps"])
        )
        return torch.cumprod(1.0 - betas, dim=0).numpy().astype(np.float64)
    from diffusers import DDPMScheduler

    try:
        scheduler = DDPMScheduler.from_config(scheduler_config)
    except (ValueError, NotImplementedError, TypeError) as e:
        raise GlyphEngineError(f"unsupported training noise schedule: {e}") from None
    return scheduler.alphas_cumprod.numpy().astype(np.float64)


# --- glyffuser diffusers folder ----------------------------------------------------------


def load_diffusers_folder(folder: Path, text_encoder: str = DEFAULT_TEXT_ENCODER) -> Glyffuser:
    index = folder / "model_index.json"
    if not index.is_file():
        raise GlyphEngineError(
            f"{folder} is a folder but not a diffusers model (no model_index.json); pass a glyffuser "
            "diffusers folder or a glyph-engine checkpoint file."
        )
    unet_dir, scheduler_file = folder / "unet", folder / "scheduler" / "scheduler_config.json"
    for needed in (unet_dir / "config.json", scheduler_file):
        if not needed.is_file():
            raise GlyphEngineError(f"{folder} lacks {needed.relative_to(folder)}; is the download complete?")
    unet_config = json.loads((unet_dir / "config.json").read_text())
    scheduler_config = _read_json(scheduler_file)
    weights = sorted(unet_dir.glob("*.safetensors"))
    if not weights:
        raise GlyphEngineError(
            f"{unet_dir} has no .safetensors weights; glyph-engine does not unpickle .bin files. "
            "Convert them to safetensors first."
        )

    from diffusers import UNet2DConditionModel

    encoder, tokenizer = load_text_encoder(text_encoder)
    validate_configs(unet_config, encoder.config.to_dict(), scheduler_config)
    try:
        unet = UNet2DConditionModel.from_pretrained(unet_dir, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise GlyphEngineError(f"cannot load the U-Net from {unet_dir}: {str(e).splitlines()[0]}") from None

    return Glyffuser(
        unet_source=unet.float().eval(),
        text_encoder_source=encoder,
        image_shape=image_shape_of(unet.config),
        tokenizer_source=tokenizer,
        scheduler_config={k: v for k, v in scheduler_config.items() if not k.startswith("_")},
        alphas_cumprod=_alphas_cumprod(scheduler_config),
        source=str(folder),
        sha256=source_sha256(folder, text_encoder),
        guidance_embedding=embeds_guidance(unet.config),
        metadata={"converted_from": str(folder), "text_encoder": text_encoder},
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GlyphEngineError(f"cannot read {path}: {e}") from None


def load_text_encoder(name_or_path: str) -> tuple[T5EncoderModel, PreTrainedTokenizerBase]:
    """The T5 encoder and its tokenizer, from a Hugging Face hub id or a local folder."""
    from transformers import AutoTokenizer, T5EncoderModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        encoder = T5EncoderModel.from_pretrained(name_or_path, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise GlyphEngineError(
            f"cannot load the T5 text encoder {name_or_path!r} ({str(e).splitlines()[0]}). Without access to "
            "the Hugging Face hub, pass --text-encoder with a local folder holding config.json, "
            "model.safetensors and the tokenizer files."
        ) from None
    return encoder.float().eval(), tokenizer


def convert_diffusers_folder(
    folder: Path,
    out: Path,
    text_encoder: str = DEFAULT_TEXT_ENCODER,
    default_guidance: float = 1.0,
    dtype: torch.dtype | None = None,
) -> str:
    """Writes a glyffuser diffusers folder plus its T5 as one checkpoint; returns its sha256."""
    if not folder.is_dir():
        raise GlyphEngineError(f"{folder} is not a folder; convert takes a glyffuser diffusers folder.")
    check_guidance(default_guidance, "--default-guidance")
    check_writable_file(out)
    model = load_diffusers_folder(folder, text_encoder)
    model.default_guidance = default_guidance
    return save_checkpoint(model, out, dtype=dtype)
