"""The loaded glyffuser: U-Net, T5 text encoder, tokenizer and how they are to be used."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:  # importing diffusers and transformers' models takes seconds; see Glyffuser
    from diffusers import UNet2DConditionModel
    from transformers import PreTrainedTokenizerBase, T5EncoderModel

from glyph_engine.errors import GlyphEngineError
from glyph_engine.text import PromptTokenizer

# How the unconditional (guidance-free) text embedding is made:
# "zeros": an all-zero embedding, as the glyffuser's author trains condition dropout;
# "empty": the encoding of the empty prompt, as Stable Diffusion does.
Unconditional = Literal["zeros", "empty"]

# The published glyffuser's U-Net (yuewu/glyffuser, unet/config.json), about 131M parameters.
GLYFFUSER_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 512,
    "encoder_hid_dim": 512,
    "encoder_hid_dim_type": "text_proj",
    "addition_embed_type": "text",
}

# The glyffuser's training schedule (DDPMScheduler(num_train_timesteps=1000) defaults).
GLYFFUSER_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}

DEFAULT_TEXT_ENCODER = "google-t5/t5-small"
# The models shipped inside the package, by the short name `--ckpt` also takes. glyffuser-small:
# the small glyffuser trained on this project's machines; glyffuser-small-distilled: its 8-step
# student with guidance built in (`glyph-engine distill`), the default since it passed the
# quality gate against it (engine/models/MODEL_CARD.md).
_MODELS = Path(__file__).parent / "models"
EMBEDDED_MODELS: dict[str, Path] = {
    "glyffuser-small-distilled": _MODELS / "glyffuser-small-distilled.pt",
    "glyffuser-small": _MODELS / "glyffuser-small.pt",
}
DEFAULT_MODEL = "glyffuser-small-distilled"
TEACHER_MODEL = "glyffuser-small"  # what every embedded student was distilled from: the peer's weights
DEFAULT_CHECKPOINT = EMBEDDED_MODELS[DEFAULT_MODEL]
TEACHER_CHECKPOINT = EMBEDDED_MODELS[TEACHER_MODEL]
MAX_TEXT_LENGTH = 256  # the glyffuser's tokenizer max_length


def checkpoint_path(source: str | Path) -> Path:
    """`source` as a path: an embedded model's short name where no file or folder has that name."""
    path = Path(source)
    return EMBEDDED_MODELS.get(str(source), path) if not path.exists() else path


def missing_checkpoint(path: Path) -> str:
    return (
        f"checkpoint {path} does not exist; pass a glyph-engine checkpoint (.pt), a glyffuser diffusers folder "
        f"or an embedded model's name ({', '.join(EMBEDDED_MODELS)})."
    )


# Bounds on the config values that size what is built and allocated (image size, layer
# counts, widths): far beyond any glyffuser (128px, 4 blocks of up to 512 channels, T5-small),
# far below what would exhaust memory. Without them a damaged or hostile file asks for,
# say, 160 GB of noise (sample_size 100000) or a million layers.
UNET_LIMITS: dict[str, tuple[int, int]] = {
    "sample_size": (8, 1024),
    "in_channels": (1, 16),
    "out_channels": (1, 16),
    "block_out_channels": (1, 4096),
    "layers_per_block": (1, 16),
    "transformer_layers_per_block": (1, 16),
    "cross_attention_dim": (1, 4096),
    "encoder_hid_dim": (1, 4096),
    "attention_head_dim": (1, 4096),
    "num_attention_heads": (1, 1024),
    "addition_embed_type_num_heads": (1, 1024),
    "norm_num_groups": (1, 4096),
}
TEXT_ENCODER_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1_000_000),
    "d_model": (1, 4096),
    "d_kv": (1, 1024),
    "d_ff": (1, 16384),
    "num_layers": (1, 48),
    "num_heads": (1, 128),
    "relative_attention_num_buckets": (1, 1024),
    "relative_attention_max_distance": (1, 100_000),
}
SCHEDULER_LIMITS: dict[str, tuple[int, int]] = {"num_train_timesteps": (2, 100_000)}
MAX_BLOCKS = 8  # entries in a per-block list (block_out_channels, layers_per_block, ...)


@dataclass
class Glyffuser:
    """Everything needed to turn prompts into glyphs, whatever the file it came from.

    The U-Net, the text encoder and the Hugging Face tokenizer may be given as functions that
    build them: `unet`, `text_encoder` and `tokenizer` build them on first use. A run whose
    compiled artifacts are cached never touches them, and so never pays for importing
    diffusers and transformers (seconds on a small CPU, most of a warm start): it tokenizes
    with `prompt_tokenizer`.
    """

    unet_source: UNet2DConditionModel | Callable[[], UNet2DConditionModel]
    text_encoder_source: T5EncoderModel | Callable[[], T5EncoderModel]
    image_shape: tuple[int, int, int]  # (C, H, W) the U-Net draws
    tokenizer_source: PreTrainedTokenizerBase | Callable[[], PreTrainedTokenizerBase]
    scheduler_config: dict[str, Any]  # the training noise schedule (DDPMScheduler config)
    alphas_cumprod: np.ndarray  # of that schedule, as diffusers computes it
    source: str  # where it was loaded from, for messages
    sha256: str  # content hash of the weights, recorded in every output
    pixel_range: tuple[float, float] = (0.0, 1.0)  # glyffuser: white 1, ink 0
    unconditional: Unconditional = "zeros"
    default_guidance: float = 1.0  # 1.0 = no guidance; CFG-trained models want 5-15
    clamp_x0: bool = False  # clamp each step's x0 to the pixel range by default (steadies weak models)
    # Default for GenerationSettings.guidance_interval: guide only at noise levels in (low, high].
    guidance_interval: tuple[float, float] | None = None
    center_noise: bool = False  # default for GenerationSettings.center_noise
    # A distilled student (`glyph-engine distill`): its U-Net takes the guidance scale as an
    # input (config class_embed_type "timestep", fed `guidance_labels`), so each step is one
    # pass with no unconditional half; read from the U-Net's config.
    guidance_embedding: bool = False
    # Sampling defaults the file records; None: GenerationSettings' (20 steps, dpmpp-2m, its order).
    # A distilled student records all three (what it was trained for); a teacher may record
    # steps alone, fewer than 20 where they passed the quality gate against its 20
    # (glyffuser-small: 14, engine/models/MODEL_CARD.md).
    default_steps: int | None = None
    default_sampler: str | None = None
    default_order: int | None = None
    max_text_length: int = MAX_TEXT_LENGTH
    metadata: dict[str, str] = field(default_factory=dict)  # free-form notes from the file
    # The engine's tokenizer (`tokenizers` alone); None: made from `tokenizer` on first use.
    prompt_tokenizer_source: PromptTokenizer | None = None

    @property
    def unet(self) -> UNet2DConditionModel:
        if not isinstance(self.unet_source, torch.nn.Module):
            self.unet_source = self.unet_source()
        return self.unet_source

    @property
    def text_encoder(self) -> T5EncoderModel:
        if not isinstance(self.text_encoder_source, torch.nn.Module):
            self.text_encoder_source = self.text_encoder_source()
        return self.text_encoder_source

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The Hugging Face tokenizer: training, the peer and checkpoint writing use it."""
        if inspect.isfunction(self.tokenizer_source):  # a tokenizer is callable too: only a function builds one
            self.tokenizer_source = self.tokenizer_source()
        return self.tokenizer_source

    @property
    def prompt_tokenizer(self) -> PromptTokenizer:
        if self.prompt_tokenizer_source is None:
            self.prompt_tokenizer_source = PromptTokenizer.of(self.tokenizer, self.max_text_length)
        return self.prompt_tokenizer_source


def image_shape_of(unet_config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of the images a U-Net with this (diffusers) config draws."""
    size = unet_config["sample_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(unet_config["in_channels"]), int(h), int(w))


def unet_parameter_count(model: Glyffuser) -> int:
    return sum(p.numel() for p in model.unet.parameters())


def validate_configs(
    unet_config: dict[str, Any], text_config: dict[str, Any], scheduler_config: dict[str, Any]
) -> None:
    """Refuses configurations glyph-engine cannot serve, with a reason a user can act on."""
    if unet_config.get("sample_size") is None:
        raise GlyphEngineError("the U-Net config has no sample_size (the image size); the model is incomplete.")
    for what, config, limits in (
        ("U-Net", unet_config, UNET_LIMITS),
        ("text encoder", text_config, TEXT_ENCODER_LIMITS),
        ("noise schedule", scheduler_config, SCHEDULER_LIMITS),
    ):
        for key, (low, high) in limits.items():
            if config.get(key) is not None:
                _check_size(what, key, config[key], low, high)
    name = unet_config.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise GlyphEngineError(f"the U-Net is a {name}; glyph-engine serves diffusers' UNet2DConditionModel only.")
    if unet_config.get("in_channels") != unet_config.get("out_channels", unet_config.get("in_channels")):
        raise GlyphEngineError(
            "the U-Net's in_channels and out_channels differ; an epsilon-predicting glyffuser needs them equal."
        )
    hid_type = unet_config.get("encoder_hid_dim_type")
    if hid_type not in (None, "text_proj"):
        raise GlyphEngineError(f"encoder_hid_dim_type={hid_type!r} is not supported (use 'text_proj' or none).")
    class_type = unet_config.get("class_embed_type")
    if class_type not in (None, "timestep"):
        raise GlyphEngineError(
            f"class_embed_type={class_type!r} is not supported (none, or 'timestep': a distilled student's "
            "guidance input)."
        )
    add_type = unet_config.get("addition_embed_type")
    if add_type not in (None, "text"):
        raise GlyphEngineError(f"addition_embed_type={add_type!r} is not supported (use 'text' or none).")
    d_model = text_config.get("d_model")
    expected = unet_config.get("encoder_hid_dim") if hid_type == "text_proj" else unet_config.get("cross_attention_dim")
    if d_model != expected:
        raise GlyphEngineError(
            f"the text encoder's width (d_model={d_model}) does not match what the U-Net expects ({expected}); "
            "pair the U-Net with the T5 encoder it was trained with."
        )
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise GlyphEngineError(
            f"the model predicts {prediction!r}; glyph-engine's sampler supports epsilon prediction only."
        )


def _check_size(what: str, key: str, value: Any, low: int, high: int) -> None:
    """`value` is an integer in [low, high], or a list of at most MAX_BLOCKS of them (lists
    may nest one level: per block, per layer)."""
    values = value if isinstance(value, list | tuple) else [value]
    flat = [v for item in values for v in (item if isinstance(item, list | tuple) else [item])]
    fits = len(values) <= MAX_BLOCKS and all(
        isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in flat
    )
    if not fits:
        allowed = f"a whole number from {low} to {high}"
        if isinstance(value, list | tuple):
            allowed += f", at most {MAX_BLOCKS} of them"
        raise GlyphEngineError(
            f"the {what} config's {key} is {str(value)[:60]}, but glyph-engine serves {allowed}; "
            "the model file is damaged or not a glyffuser."
        )


def placed(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`module` on `device` in `dtype`: itself when already there, else a moved copy.

    Never moves the module it was given: one loaded model serves several backends and the
    peer (the benchmark builds a few side by side), and a cast in place would change them all.
    """
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device == device and (t.dtype == dtype or not t.is_floating_point()) for t in tensors):
        return module
    return copy.deepcopy(module).to(device, dtype)


# Guidance scales are a few units; the U-Net's sinusoidal timestep features are laid out for
# values up to ~1000, so the scale is stretched before it is embedded (fixed: a student is
# trained with it).
GUIDANCE_EMBED_SCALE = 100.0


def guidance_labels(guidance: torch.Tensor | float, batch: int, device: torch.device | str) -> torch.Tensor:
    """The `class_labels` a guidance-embedding U-Net takes: (batch,) float32."""
    value = torch.as_tensor(guidance, dtype=torch.float32, device=device) * GUIDANCE_EMBED_SCALE
    return value.expand(batch) if value.dim() == 0 else value


def embeds_guidance(unet_config: Mapping[str, Any]) -> bool:
    """Whether a U-Net with this config takes the guidance scale as its class label."""
    return unet_config.get("class_embed_type") == "timestep"
