"""The inductor backend's U-Net calls, with stand-in packages (no compile): a batch larger
than one call holds runs as equal chunks, in order, each with its own rows' inputs."""

from __future__ import annotations

import pytest
import torch

from glyph_engine.backends.inductor import PIXELS_PER_CALL, InductorBackend
from glyph_engine.settings import Precision


def recording_unet(calls):
    """A stand-in package: returns, for each row, a value that depends on that row's inputs."""

    def unet(sample, timesteps, text, mask, *guidance):
        calls.append({"rows": [t.shape[0] for t in (sample, timesteps, text, mask, *guidance)]})
        scale = guidance[0] if guidance else torch.ones_like(timesteps)
        per_row = (text.sum((1, 2)) + mask.sum(1) + timesteps * scale).view(-1, 1, 1, 1)
        return sample * 2 + per_row

    return unet


def expected(x, timestep, text, mask, guidance=1.0):
    return x * 2 + (text.sum((1, 2)) + mask.sum(1) + timestep * guidance).view(-1, 1, 1, 1)


@pytest.mark.parametrize(
    ("rows", "size", "chunks"),
    [
        (128, 32, [64, 64]),  # a guided batch of 64 images
        (129, 32, [43, 43, 43]),
        (64, 32, [64]),
        (1, 32, [1]),
        (256, 16, [256]),  # smaller images: more rows per call
        (5, 128, [3, 2]),  # larger ones: fewer
    ],
)
def test_a_batch_runs_in_chunks_of_at_most_one_call(rows, size, chunks):
    calls = []
    backend = InductorBackend(recording_unet(calls), None, Precision.bf16)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, size, size, generator=generator)
    text = torch.randn(rows, 3, 8, generator=generator)
    mask = torch.randint(0, 2, (rows, 3), generator=generator)
    out = backend.denoise(x, 500, text, mask)
    assert [c["rows"] for c in calls] == [[n] * 4 for n in chunks]
    assert max(chunks) * size * size <= max(PIXELS_PER_CALL, size * size)
    torch.testing.assert_close(out, expected(x, 500, text, mask), rtol=0, atol=0)


def test_a_students_guidance_reaches_every_chunk():
    calls = []
    backend = InductorBackend(recording_unet(calls), None, Precision.bf16)
    x, text, mask = torch.randn(100, 1, 32, 32), torch.randn(100, 2, 8), torch.ones(100, 2, dtype=torch.long)
    out = backend.denoise(x, 20, text, mask, guidance=3.0)
    assert [c["rows"] for c in calls] == [[50] * 5, [50] * 5]
    torch.testing.assert_close(out, expected(x, 20, text, mask, guidance=3.0), rtol=0, atol=0)
