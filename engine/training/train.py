"""Training a glyffuser-style model from scratch on the glyph set, sized for a CPU.

A diffusers `UNet2DConditionModel` (cross-attention only at the low resolutions, where it
is cheap) and a small `T5EncoderModel` trained jointly with it, with a sentencepiece
tokenizer trained on the definitions (no pretrained T5 can be downloaded here). Epsilon
prediction on the glyffuser's schedule, pixels in [0, 1], and condition dropout to the
all-zero embedding so classifier-free guidance works. Resumable: the whole state is saved
to `workdir/train_state.pt` (plain tensors and data, loaded with weights_only=True).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm import tqdm
from transformers import T5Config, T5EncoderModel

from glyph_engine.checkpoint import load_model, save_checkpoint, tokenizer_files, tokenizer_from_files
from glyph_engine.errors import GlyphEngineError
from glyph_engine.files import atomic_path, zip_damage
from glyph_engine.model import GLYFFUSER_SCHEDULER_CONFIG, MAX_TEXT_LENGTH, Glyffuser, image_shape_of
from glyph_engine.text import train_tokenizer
from glyph_engine.training.dataset import RADICALS, GlyphSet, load_glyph_set
from glyph_engine.training.rates import warmed_up

logger = logging.getLogger(__name__)

STATE = "train_state.pt"
SAMPLE_PROMPTS = ["metal", "water", "wood", "fire", "grass", "hand", "heart", "speech"]


@dataclass(frozen=True)
class TrainConfig:
    resolution: int = 32  # 32x32 trains at tens of images/s on 2 cores; radicals stay legible
    # Measured on 2 cores, batch 64, forward+backward: (32, 64, 128) 27.7 img/s (4.3M params);
    # (64, 128, 256) 10.2 img/s (16.6M, over the 25 MB budget in FP16).
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    text_dim: int = 128  # T5 d_model = the U-Net's cross-attention width
    text_layers: int = 3
    text_heads: int = 4
    vocab_size: int = 2000  # sentencepiece pieces learnt from the definitions
    batch_size: int = 64
    learning_rate: float = 6e-4
    warmup_steps: int = 200
    condition_dropout: float = 0.15  # the glyffuser author: 10-20% for classifier-free guidance
    # Share of captions replaced, each step, by one of their clauses ("gold; metals in general"
    # -> "gold"): prompts are a word or two ("metal") while definitions list 2.6 senses in 5.5
    # words on average, and a single sense is a sharper link from words to the glyph.
    clause_sampling: float = 0.5
    # Weight of an auxiliary loss on the text encoder: predict the glyph's radical (from the
    # dataset) from the mean of its caption's encoding, with a linear head used only in
    # training. It stands in for what a pretrained T5 brings: after 3,407 steps without it,
    # the model's loss was the same to 4 digits with the true, a shuffled or no caption; the
    # diffusion loss alone gives the text encoder too weak a signal to learn from on a CPU.
    radical_loss: float = 0.1
    guidance: float = 4.0  # recorded as the checkpoint's default
    # Also a default for sampling: the schedule ends at alpha_bar 4e-5, so the first steps'
    # x0 = (x - sqrt(1 - a) eps) / sqrt(a) multiplies any error in eps by up to 160; clamping
    # x0 to the pixel range keeps a small model's samples from saturating to black.
    clamp_x0: bool = True
    # Samples and the final checkpoint use an exponential moving average of the weights: with a
    # constant learning rate the raw weights jitter from step to step. diffusers' warm-up
    # ((1 + n) / (10 + n)) keeps short runs close to the latest weights.
    ema_decay: float = 0.999
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        # JSON turns the tuples into lists; settings missing from older files take their defaults.
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()})

    def unet_config(self) -> dict[str, Any]:
        return {
            "sample_size": self.resolution,
            "in_channels": 1,
            "out_channels": 1,
            "layers_per_block": self.layers_per_block,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": list(self.down_block_types),
            "up_block_types": list(self.up_block_types),
            "cross_attention_dim": self.text_dim,
            "encoder_hid_dim": self.text_dim,
            "encoder_hid_dim_type": "text_proj",
            "addition_embed_type": "text",
            "addition_embed_type_num_heads": self.text_heads,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        }

    def text_config(self, vocab_size: int) -> dict[str, Any]:
        return {
            "vocab_size": vocab_size,
            "d_model": self.text_dim,
            "d_kv": self.text_dim // self.text_heads,
            "d_ff": 4 * self.text_dim,
            "num_layers": self.text_layers,
            "num_heads": self.text_heads,
            "relative_attention_num_buckets": 16,
            "feed_forward_proj": "relu",
            "dropout_rate": 0.0,
        }


@dataclass
class TrainState:
    config: TrainConfig
    unet: UNet2DConditionModel
    text_encoder: T5EncoderModel
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    ema: EMAModel
    radical_head: torch.nn.Linear  # training only: caption encoding -> radical logits
    step: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # mean loss per 50 steps (fewer at a run's end)
    dataset_size: int = 0  # glyphs in the set of the latest run (for epochs in the model card)


def _state(config: TrainConfig, unet: UNet2DConditionModel, text_encoder: T5EncoderModel, tokenizer: Any) -> TrainState:
    """A state around these modules, with a fresh optimizer, weight average and radical head."""
    params = [*unet.parameters(), *text_encoder.parameters()]
    head = torch.nn.Linear(config.text_dim, RADICALS + 1)
    optimizer = torch.optim.AdamW([*params, *head.parameters()], lr=config.learning_rate, weight_decay=0.0)
    ema = EMAModel(params, decay=config.ema_decay, foreach=True)
    return TrainState(config, unet, text_encoder, tokenizer, optimizer, ema, head)


def _new_state(config: TrainConfig, captions: list[str]) -> TrainState:
    torch.manual_seed(config.seed)
    tokenizer = train_tokenizer(captions, config.vocab_size)
    unet = UNet2DConditionModel(**config.unet_config())
    text_encoder = T5EncoderModel(T5Config(**config.text_config(len(tokenizer))))
    return _state(config, unet, text_encoder, tokenizer)


def _parameters(state: TrainState) -> list[torch.nn.Parameter]:
    return [*state.unet.parameters(), *state.text_encoder.parameters()]


def state_from_checkpoint(path: Path) -> TrainState:
    """Warm start from a checkpoint `train` wrote (e.g. the embedded model), without its
    optimizer state: training goes on from its weights, tokenizer, settings and step count."""
    model = load_model(path)
    try:
        config = TrainConfig.from_json(model.metadata["config"])
        step = int(model.metadata["steps"])
        seconds = 3600 * float(model.metadata.get("train_hours", 0.0))
    except (KeyError, TypeError, ValueError):
        raise GlyphEngineError(
            f"{path} was not written by `glyph-engine train` (no training settings in it); "
            "--init takes a checkpoint from `glyph-engine train`, such as the embedded glyffuser-small (a distilled "
            "student is not one)."
        ) from None
    state = _state(config, model.unet.float().train(), model.text_encoder.float().train(), model.tokenizer)
    for param in _parameters(state):
        param.requires_grad_(True)
    state.step, state.seconds = step, seconds
    return state


def save_state(state: TrainState, workdir: Path) -> None:
    payload = {
        "config": state.config.to_json(),
        "unet": state.unet.state_dict(),
        "text_encoder": state.text_encoder.state_dict(),
        "tokenizer": tokenizer_files(state.tokenizer),
        "optimizer": state.optimizer.state_dict(),
        "ema": state.ema.state_dict(),
        "radical_head": state.radical_head.state_dict(),
        "step": state.step,
        "seconds": state.seconds,
        "losses": list(state.losses),
        "rng": torch.get_rng_state(),
    }
    with atomic_path(workdir / STATE) as tmp:
        torch.save(payload, tmp)


def load_state(workdir: Path, config: TrainConfig | None) -> TrainState:
    path = workdir / STATE
    payload = read_state(path, _unusable_state, "training state")
    if "radical_head" not in payload:
        raise GlyphEngineError(
            f"{path} predates the radical loss and cannot be resumed; go on from its checkpoint "
            f"instead: --init {workdir / 'glyffuser.pt'} with a new --workdir."
        )
    try:
        saved = TrainConfig.from_json(payload["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise _unusable_state(path, f"bad or missing settings: {e}") from None
    if config is not None and config != saved:
        raise GlyphEngineError(f"{path} was trained with other settings; use another --workdir.")
    tokenizer = tokenizer_from_files(payload.get("tokenizer"), str(path))
    try:
        return _restore(saved, tokenizer, payload)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # missing parts, wrong shapes
        raise _unusable_state(path, " ".join(str(e).split())[:200]) from None


def read_state(path: Path, unusable: Callable[[Path, str], GlyphEngineError], kind: str) -> dict[str, Any]:
    """A resumable state's payload (train's or distill's, `kind` naming it), or
    `unusable(path, reason)` raised."""
    # CRC-32s first (see zip_damage): a state with damaged weights would otherwise resume.
    damage = zip_damage(path)
    if damage is not None:
        raise unusable(path, damage)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - damaged bytes make the unpickler raise anything
        raise unusable(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if not isinstance(payload, dict):
        raise unusable(path, f"not a {kind}")
    return payload


def _unusable_state(path: Path, reason: str) -> GlyphEngineError:
    return GlyphEngineError(
        f"{path} is damaged or incomplete ({reason}) and cannot be resumed. Delete it to start this --workdir "
        f"from scratch; if {path.parent / 'glyffuser.pt'} exists, go on from it with --init in a new --workdir."
    )


def _restore(config: TrainConfig, tokenizer: Any, payload: dict[str, Any]) -> TrainState:
    unet = UNet2DConditionModel(**config.unet_config())
    unet.load_state_dict(payload["unet"])
    text_encoder = T5EncoderModel(T5Config(**config.text_config(len(tokenizer))))
    text_encoder.load_state_dict(payload["text_encoder"])
    state = _state(config, unet, text_encoder, tokenizer)
    state.radical_head.load_state_dict(payload["radical_head"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.ema.load_state_dict(payload["ema"])
    torch.set_rng_state(payload["rng"])
    state.step, state.seconds, state.losses = int(payload["step"]), float(payload["seconds"]), list(payload["losses"])
    return state


@contextmanager
def averaged_weights(state: TrainState) -> Iterator[None]:
    """The moving-average weights in the modules, in eval mode, for sampling or export."""
    params = _parameters(state)
    state.ema.store(params)
    state.ema.copy_to(params)
    state.unet.eval()
    state.text_encoder.eval()
    try:
        yield
    finally:
        state.ema.restore(params)
        state.unet.train()
        state.text_encoder.train()


def to_glyffuser(state: TrainState, source: str) -> Glyffuser:
    """The model being trained, as the pipeline and the checkpoint writer take it."""
    schedule = DDPMScheduler(**GLYFFUSER_SCHEDULER_CONFIG)
    return Glyffuser(
        unet_source=state.unet,
        text_encoder_source=state.text_encoder,
        image_shape=image_shape_of(state.unet.config),
        tokenizer_source=state.tokenizer,
        scheduler_config=dict(GLYFFUSER_SCHEDULER_CONFIG),
        alphas_cumprod=schedule.alphas_cumprod.numpy().astype(np.float64),
        source=source,
        sha256="training",
        unconditional="zeros",
        default_guidance=state.config.guidance,
        clamp_x0=state.config.clamp_x0,
        metadata={"trained_steps": str(state.step)},
    )


_CLAUSE = re.compile(r"[;,] ")


def sample_captions(captions: list[str], share: float, rng: np.random.Generator) -> list[str]:
    """Each caption, or with probability `share` one of its clauses chosen at random."""
    out = []
    for caption in captions:
        clauses = _CLAUSE.split(caption)
        out.append(clauses[rng.integers(len(clauses))] if rng.random() < share else caption)
    return out


def _batches(glyphs: GlyphSet, batch_size: int, seed: int, start_step: int):
    """Endless shuffled batches, deterministic in (seed, epoch), resumable at any step."""
    n = len(glyphs)
    per_epoch = n // batch_size
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        yield order[k * batch_size : (k + 1) * batch_size]
        step += 1


def train(
    dataset: Path,
    workdir: Path,
    config: TrainConfig | None = None,
    max_steps: int | None = None,
    minutes: float | None = None,
    save_every: int = 200,
    sample_every: int = 1000,
    progress: bool = False,
    on_sample: Callable[[Path], None] | None = None,
    init: Path | None = None,
) -> TrainState:
    """Trains (or resumes) in `workdir` until `max_steps` or `minutes` of this run; a new
    workdir starts from `init` (a checkpoint `train` wrote) when given, else from scratch."""
    glyphs = load_glyph_set(dataset)
    state: TrainState | None = None
    if (workdir / STATE).is_file():
        if init is not None:
            raise GlyphEngineError(
                f"{workdir} already holds a training state; drop --init to resume it, or use a new --workdir."
            )
        state = load_state(workdir, config)
        logger.info("resuming from step %d", state.step)
    elif init is not None:
        state = state_from_checkpoint(init)
        if config is not None and config != state.config:
            raise GlyphEngineError(f"{init} was trained with other settings than those asked for.")
        logger.info("starting from %s at step %d", init, state.step)
    config = state.config if state is not None else config or TrainConfig()
    _check_dataset(glyphs, config, dataset)  # before a new state's tokenizer is trained on it
    if state is None:
        state = _new_state(config, [str(c) for c in glyphs.captions])
    state.dataset_size = len(glyphs)
    workdir.mkdir(parents=True, exist_ok=True)
    images = torch.from_numpy(glyphs.images).float().div_(255).unsqueeze(1)  # (N, 1, H, W) in [0, 1]
    captions = [str(c) for c in glyphs.captions]
    radicals = torch.from_numpy(glyphs.radicals.astype(np.int64))
    abar = DDPMScheduler(**GLYFFUSER_SCHEDULER_CONFIG).alphas_cumprod
    state.unet.train()
    state.text_encoder.train()
    started, run_start = time.perf_counter(), state.step
    deadline = started + 60 * minutes if minutes else math.inf
    total = max_steps if max_steps is not None else None
    bar = tqdm(total=total, initial=state.step, desc="training", unit="step", file=sys.stderr, disable=not progress)
    window: list[float] = []
    for idx in _batches(glyphs, config.batch_size, config.seed, state.step):
        if (max_steps is not None and state.step >= max_steps) or time.perf_counter() > deadline:
            break
        rng = np.random.default_rng([config.seed, state.step])  # the same captions when resumed
        batch_captions = sample_captions([captions[i] for i in idx], config.clause_sampling, rng)
        loss, radical_loss = _train_step(state, images[idx], batch_captions, radicals[idx], abar)
        window.append(loss)
        state.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(window[-50:]):.4f}", radical=f"{radical_loss:.2f}")
        if state.step % 50 == 0:
            state.losses.append(float(np.mean(window)))
            window = []
        if state.step % save_every == 0:
            state.seconds += time.perf_counter() - started
            started = time.perf_counter()
            save_state(state, workdir)
        if state.step % sample_every == 0:
            path = write_samples(state, workdir)
            if on_sample:
                on_sample(path)
    bar.close()
    if window:  # the steps since the last 50-step mark, so a short run still reports a loss
        state.losses.append(float(np.mean(window)))
    state.seconds += time.perf_counter() - started
    if state.step > run_start:
        save_state(state, workdir)
    return state


def _check_dataset(glyphs: GlyphSet, config: TrainConfig, dataset: Path) -> None:
    if glyphs.images.shape[1] != config.resolution:
        raise GlyphEngineError(
            f"{dataset} has {glyphs.images.shape[1]}px glyphs; the model trains at {config.resolution}px: "
            f"build the dataset with --resolution {config.resolution}."
        )
    # Batches are whole: an epoch of a set smaller than one batch would have no batches.
    if len(glyphs) < config.batch_size:
        raise GlyphEngineError(
            f"{dataset} has {len(glyphs)} glyphs, fewer than one training batch ({config.batch_size}); "
            f"build a larger one with `glyph-engine dataset` (a --limit of at least {config.batch_size}, or none)."
        )


def _train_step(
    state: TrainState, x0: torch.Tensor, captions: list[str], radicals: torch.Tensor, abar: torch.Tensor
) -> tuple[float, float]:
    """One optimizer step; returns the diffusion loss and the radical loss."""
    config = state.config
    for group in state.optimizer.param_groups:
        group["lr"] = warmed_up(config.learning_rate, state.step, config.warmup_steps)
    tokens = state.tokenizer(
        captions, padding="longest", max_length=MAX_TEXT_LENGTH, truncation=True, return_tensors="pt"
    )
    mask = tokens["attention_mask"]
    text = state.text_encoder(input_ids=tokens["input_ids"], attention_mask=mask).last_hidden_state
    text = text * mask.unsqueeze(-1)
    radical_loss = torch.nn.functional.cross_entropy(state.radical_head(mean_encoding(text, mask)), radicals)
    # Condition dropout: the all-zero embedding with every position attended, exactly what
    # sampling feeds the unconditional pass.
    drop = torch.rand(len(captions)) < config.condition_dropout
    text = torch.where(drop[:, None, None], torch.zeros_like(text), text)
    mask = torch.where(drop[:, None], torch.ones_like(mask), mask)
    t = torch.randint(0, len(abar), (len(captions),))
    noise = torch.randn_like(x0)
    a = abar[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps = state.unet(noisy, t, encoder_hidden_states=text, encoder_attention_mask=mask).sample
    loss = torch.nn.functional.mse_loss(eps, noise)
    state.optimizer.zero_grad(set_to_none=True)
    (loss + config.radical_loss * radical_loss).backward()
    params = _parameters(state)
    torch.nn.utils.clip_grad_norm_([*params, *state.radical_head.parameters()], 1.0)
    state.optimizer.step()
    state.ema.step(params)
    return loss.item(), radical_loss.item()


def mean_encoding(text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D) encodings with padded positions zeroed -> (B, D) mean over the real tokens."""
    return text.sum(dim=1) / mask.sum(dim=1, keepdim=True)


def write_samples(state: TrainState, workdir: Path) -> Path:
    """A grid of 8 glyphs for each of a few prompts, with the model as it is now."""
    from glyph_engine.backends.pytorch import TorchBackend
    from glyph_engine.images import grid, save_png, to_uint8
    from glyph_engine.pipeline import generate
    from glyph_engine.settings import GenerationSettings

    with averaged_weights(state):
        model = to_glyffuser(state, str(workdir))
        result = generate(model, TorchBackend(model), SAMPLE_PROMPTS, 8, GenerationSettings(seed=0))
    path = workdir / "samples" / f"step_{state.step:06d}.png"
    path.parent.mkdir(exist_ok=True)
    save_png(grid(to_uint8(result.images), 8), path, {"prompts": SAMPLE_PROMPTS, "step": state.step})
    return path


def finish(state: TrainState, out: Path, source: str, card: dict[str, Any]) -> str:
    """Writes the final FP16 single-file checkpoint of the averaged weights; returns its sha256."""
    with averaged_weights(state):
        model = to_glyffuser(state, source)
        model.metadata = {k: str(v) for k, v in card.items()}
        return save_checkpoint(model, out, dtype=torch.float16)
