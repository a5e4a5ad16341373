"""Glyph images out: uint8 conversion, grids, PNG files with generation metadata."""

from __future__ import annotations

import io
import json
import math
import shutil
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from glyph_engine.files import atomic_path, make_staging_dir, refuse_non_regular


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] to (N, H, W) or (N, H, W, C) uint8."""
    pixels = (images.clamp(0, 1) * 255).round().to("cpu").numpy().astype(np.uint8)
    pixels = pixels.transpose(0, 2, 3, 1)
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def grid(pixels: np.ndarray, rows_of: int, pad: int = 2) -> np.ndarray:
    """Tiles images into a grid; every `rows_of` images (one prompt) start a new row block.

    Padding is white, the glyphs' background.
    """
    n, h, w = pixels.shape[:3]
    cols = _columns(rows_of)
    rows_per_group = math.ceil(rows_of / cols)
    groups = math.ceil(n / rows_of)
    out = np.full(((h + pad) * rows_per_group * groups + pad, (w + pad) * cols + pad, *pixels.shape[3:]), 255, np.uint8)
    for i, image in enumerate(pixels):
        group, k = divmod(i, rows_of)
        r, c = group * rows_per_group + k // cols, k % cols
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y : y + h, x : x + w] = image
    return out


def _columns(per_prompt: int) -> int:
    """Columns for one prompt's block: near-square, preferring a width that fills every row.

    8 images make 4x2 rather than 3+3+2; a count with no divisor near its square root
    (7, 11) keeps the square layout with a short last row.
    """
    square = math.ceil(math.sqrt(per_prompt))
    for cols in range(square, 2 * square + 1):
        if per_prompt % cols == 0:
            return cols
    return square


def png_bytes(pixels: np.ndarray, metadata: dict[str, object]) -> bytes:
    """One PNG in memory, with `metadata` as text chunks (non-strings as JSON)."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, escape_controls(value if isinstance(value, str) else json.dumps(value)))
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def escape_controls(text: str) -> str:
    """`text` with each control character (NUL, ESC, DEL, C1) written as \\uXXXX, as JSON does.

    Prompts come from users; raw controls in a text chunk break tools that print metadata
    (an ESC sequence drives the terminal of whoever runs exiftool) and PNG forbids them.
    """
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) == "Cc" else c for c in text)


def save_png(pixels: np.ndarray, path: Path, metadata: dict[str, object]) -> None:
    """Writes one PNG atomically, with `metadata` as text chunks (non-strings as JSON)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(png_bytes(pixels, metadata))


def check_folder_targets(folder: Path, count: int) -> list[str]:
    """The names `save_folder` gives `count` images, each refused now if it could not be
    replaced (a device, FIFO or folder there): callers check before minutes of sampling."""
    names = [f"{i:04d}.png" for i in range(count)]
    if folder.is_dir():
        for name in names:
            refuse_non_regular(folder / name, "another --out-dir")
    return names


def save_folder(pixels: np.ndarray, folder: Path, metadata: list[dict[str, object]]) -> list[Path]:
    """Writes one PNG per image into `folder` (created if missing) as 0000.png, 0001.png, ...

    The files are written into a hidden staging folder beside `folder` first, then moved in,
    so a failure part-way leaves `folder` as it was.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    names = check_folder_targets(folder, len(pixels))
    staging = make_staging_dir(folder, ".partial")
    try:
        for name, image, meta in zip(names, pixels, metadata, strict=True):
            save_png(image, staging / name, meta)
        if not folder.exists():
            staging.rename(folder)
        else:
            for name in names:
                # Through atomic_path, so a glyph that is a symlink is written through to its target,
                # which may be on another file system (hence a move, not a rename).
                with atomic_path(folder / name) as tmp:
                    shutil.move(staging / name, tmp)
        return [folder / name for name in names]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
