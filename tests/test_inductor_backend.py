"""The inductor backend's U-Net calls, with stand-in packages (no compile): a batch larger
than one call holds runs as equal chunks, in order, each with its own rows' inputs; how
many rows a call holds follows the activations' bytes (image size and precision)."""

from __future__ import annotations

import re

import pytest
import torch

from glyph_engine.backends.inductor import InductorBackend, check_shapes, rows_per_call
from glyph_engine.errors import GlyphEngineError
from glyph_engine.settings import Precision


def recording_unet(calls):
    """A stand-in package: returns, for each row, a value that depends on that row's inputs."""

    def unet(sample, timesteps, text, mask, *guidance):
        calls.append([t.shape[0] for t in (sample, timesteps, text, mask, *guidance)])
        scale = guidance[0] if guidance else torch.ones_like(timesteps)
        per_row = (text.sum((1, 2)) + mask.sum(1) + timesteps * scale).view(-1, 1, 1, 1)
        return sample * 2 + per_row

    return unet


def expected(x, timestep, text, mask, guidance=1.0):
    return x * 2 + (text.sum((1, 2)) + mask.sum(1) + timestep * guidance).view(-1, 1, 1, 1)


def test_rows_per_call_follow_the_activations_bytes():
    assert rows_per_call(32 * 32, "bf16") == 64  # the embedded model, measured
    assert rows_per_call(32 * 32, "fp32") == 32  # twice the bytes per row
    assert rows_per_call(16 * 16, "bf16") == 256
    assert rows_per_call(128 * 128, "bf16") == 4
    assert rows_per_call(1024 * 1024, "fp32") == 1  # never none


@pytest.mark.parametrize(
    ("rows", "size", "precision", "chunks"),
    [
        (128, 32, Precision.bf16, [64, 64]),  # a guided batch of 64 images
        (128, 32, Precision.fp32, [32, 32, 32, 32]),
        (129, 32, Precision.bf16, [43, 43, 43]),
        (64, 32, Precision.bf16, [64]),
        (1, 32, Precision.bf16, [1]),
        (256, 16, Precision.bf16, [256]),  # smaller images: more rows per call
        (5, 128, Precision.bf16, [3, 2]),  # larger ones: fewer
    ],
)
def test_a_batch_runs_in_equal_chunks_of_at_most_one_call(rows, size, precision, chunks):
    calls = []
    backend = InductorBackend(recording_unet(calls), None, precision)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, size, size, generator=generator)
    text = torch.randn(rows, 3, 8, generator=generator)
    mask = torch.randint(0, 2, (rows, 3), generator=generator)
    out = backend.denoise(x, 500, text, mask)
    assert calls == [[n] * 4 for n in chunks]
    torch.testing.assert_close(out, expected(x, 500, text, mask), rtol=0, atol=0)


def test_a_students_guidance_reaches_every_chunk():
    calls = []
    backend = InductorBackend(recording_unet(calls), None, Precision.bf16)
    x, text, mask = torch.randn(100, 1, 32, 32), torch.randn(100, 2, 8), torch.ones(100, 2, dtype=torch.long)
    out = backend.denoise(x, 20, text, mask, guidance=3.0)
    assert calls == [[50] * 5, [50] * 5]
    torch.testing.assert_close(out, expected(x, 20, text, mask, guidance=3.0), rtol=0, atol=0)


def test_inputs_of_other_static_sizes_are_refused_in_one_line():
    dims = [[None, 1, 32, 32], [None], [None, None, 512], [None, None]]
    rows = (torch.zeros(3, 1, 32, 32), torch.zeros(3), torch.zeros(3, 7, 512), torch.ones(3, 7))
    check_shapes(dims, rows)  # dynamic axes take any size
    for k, bad in [(0, torch.zeros(3, 1, 16, 32)), (2, torch.zeros(3, 7, 128)), (3, torch.ones(3, 7, 1))]:
        wrong = tuple(bad if i == k else t for i, t in enumerate(rows))
        with pytest.raises(
            GlyphEngineError, match=f"takes input {k} of shape .*; it was given {re.escape(str(tuple(bad.shape)))}"
        ):
            check_shapes(dims, wrong)
