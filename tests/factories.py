"""Small glyffuser-format models with random weights, for tests and benchmarks.

No pretrained weights can be downloaded on this project's machines, so tests build folders
in the real formats from configs: a diffusers glyffuser folder (the original's block
structure at reduced width) and a T5 encoder folder with a sentencepiece tokenizer trained
on a few definitions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from glyph_engine.model import GLYFFUSER_SCHEDULER_CONFIG, GLYFFUSER_UNET_CONFIG
from glyph_engine.text import train_tokenizer
from glyph_engine.training.distill_targets import STUDENT_SAMPLING_ORDER

DEFINITIONS = [
    "metal; gold; money",
    "water; liquid; river; stream",
    "wood; tree; timber; forest",
    "fire; flame; burn; heat",
    "heart; mind; feeling; emotion",
    "speech; words; to say; to talk",
    "hand; to grasp; to hold",
    "grass; plants; herbs; flowers",
    "a kind of fish found in the southern seas",
    "to shine brightly, as the sun at noon",
]

# The glyffuser's block structure at a width and size a CPU test runs in a fraction of a second.
TINY_UNET_CONFIG: dict[str, Any] = {
    **GLYFFUSER_UNET_CONFIG,
    "sample_size": 32,
    "block_out_channels": (32, 32, 64, 64),
    "cross_attention_dim": 64,
    "encoder_hid_dim": 64,
}

TINY_T5_CONFIG: dict[str, Any] = {
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "relu",
}


def make_tokenizer(sentences: list[str] = DEFINITIONS, vocab_size: int = 120) -> T5Tokenizer:
    return train_tokenizer(sentences * 10, vocab_size)


def make_text_encoder_folder(folder: Path, config: dict[str, Any] = TINY_T5_CONFIG, seed: int = 0) -> Path:
    """A T5 encoder folder as `T5EncoderModel.from_pretrained` and `AutoTokenizer` read it."""
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **config))
    encoder.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_glyffuser_folder(folder: Path, unet_config: dict[str, Any] = TINY_UNET_CONFIG, seed: int = 0) -> Path:
    """A diffusers folder in the glyffuser's layout: model_index.json, unet/, scheduler/."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    # Random init leaves the output conv at zero-ish scale; give every weight some signal
    # so the tests compare non-trivial outputs.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    DDPMScheduler(**GLYFFUSER_SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "GlyffuserPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


# google-t5/t5-small's encoder shape (d_model 512), with the tokenizer above.
T5_SMALL_CONFIG: dict[str, Any] = {
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "feed_forward_proj": "relu",
}


STUDENT_STEPS = 4


def student_of(teacher, class_embedding_zero: bool = True):
    """The teacher's U-Net with a guidance input (class_embed_type "timestep"), every teacher
    weight copied; with the input's last layer zeroed it predicts as the teacher's conditional."""
    config = {**teacher.unet.config, "class_embed_type": "timestep"}
    unet = UNet2DConditionModel.from_config(config)
    missing, unexpected = unet.load_state_dict(teacher.unet.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("class_embedding.") for k in missing)
    if class_embedding_zero:
        torch.nn.init.zeros_(unet.class_embedding.linear_2.weight)
        torch.nn.init.zeros_(unet.class_embedding.linear_2.bias)
    return dataclasses.replace(
        teacher,
        unet_source=unet.eval(),
        guidance_embedding=True,
        default_steps=STUDENT_STEPS,
        default_sampler="dpmpp-2m",
        default_order=STUDENT_SAMPLING_ORDER,  # as `distill` writes it
    )


def record_builds(monkeypatch, module, describe, builder: str = "_build", calls: list | None = None) -> list:
    """Records `describe(*args)` for each call of `module.<builder>` (an artifact cache miss),
    in `calls` (a new list by default, so that two builders can share one)."""
    calls = [] if calls is None else calls
    original = getattr(module, builder)

    def recording(*args):
        calls.append(describe(*args))
        return original(*args)

    monkeypatch.setattr(module, builder, recording)
    return calls


def warm_generate_imports(args: list[str], folder: Path) -> set[str]:
    """The modules a warm `generate metal -n 1 --steps 1 ARGS` imports, run as a user runs it:
    a fresh process, after a first one has filled the compiled cache."""
    command = [sys.executable, "-X", "importtime", "-m", "glyph_engine", "generate", "metal", "-n", "1", "--steps", "1"]
    # Its own temporary folder: what the runs leave there is checked (the CLI skips the
    # interpreter's last garbage collection; temporary folders must still be removed).
    temporary = folder / "tmp"
    temporary.mkdir()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TMPDIR": str(temporary)}
    for run in ("first", "warm"):
        result = subprocess.run(
            [*command, *args, "-o", str(folder / f"{run}.png")], capture_output=True, text=True, env=env, timeout=600
        )
        assert result.returncode == 0, result.stderr[-2000:]
    assert (folder / "warm.png").is_file()
    assert list(temporary.iterdir()) == []
    # `python -X importtime` reports one module per line.
    return {m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", result.stderr, re.MULTILINE)}
