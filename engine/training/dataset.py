"""The glyph training set, built the way the glyffuser's was.

Unihan `kDefinition` (Debian's `unicode-data`) for code points U+3400-U+9FFF, definitions
cleaned of CJK characters, `U+XXXX` references and non-ASCII text, each character rendered
centred on a white square with a CJK font (Debian's `fonts-noto-cjk`, Noto Sans CJK SC),
and each glyph's radical from `kRSUnicode`. Stored as one compressed `.npz`: images (N, H, W)
uint8, captions, code points and radical numbers.
"""

from __future__ import annotations

import bz2
import logging
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from glyph_engine.errors import GlyphEngineError
from glyph_engine.files import atomic_path

logger = logging.getLogger(__name__)

UNIHAN_DIR = Path("/usr/share/unicode")
DEFAULT_FONT = Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")
DEFAULT_FONT_FACE = "Noto Sans CJK SC"  # the glyffuser's Noto Sans SC design
CODEPOINTS = (0x3400, 0x9FFF)  # CJK Extension A and the Unified Ideographs
FONT_SCALE = 100 / 128  # the original: font size 100 on a 128x128 canvas
RADICALS = 214  # Kangxi radicals, numbered from 1

_PARENTHESES = re.compile(r"\([^()]*\)")
_CJK_OR_REF = re.compile(r"U\+[0-9A-Fa-f]{4,5}|[^\x00-\x7f]")


@dataclass(frozen=True)
class GlyphSet:
    images: np.ndarray  # (N, H, W) uint8, white background 255
    captions: np.ndarray  # (N,) str
    codepoints: np.ndarray  # (N,) int32
    radicals: np.ndarray  # (N,) int16, Kangxi radical number 1..214

    def __len__(self) -> int:
        return len(self.captions)


def read_unihan(path: Path, field: str) -> dict[int, str]:
    """{code point: value} for one Unihan field from a (bzip2-compressed) Unihan file."""
    opener = bz2.open if path.suffix == ".bz2" else open
    out = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.startswith("U+"):
                code, name, value = line.rstrip("\n").split("\t", 2)
                if name == field:
                    out[int(code[2:], 16)] = value
    return out


def clean_definition(text: str) -> str | None:
    """The glyffuser's cleaning: drop parts with CJK characters, U+XXXX references or non-ASCII.

    "(same as U+4E18 丘) hillock or mound" -> "hillock or mound". None if nothing is left.
    """
    text = _PARENTHESES.sub(lambda m: "" if _CJK_OR_REF.search(m.group()) else m.group(), text)
    clauses = [c.strip(" ,.") for c in text.split(";")]
    kept = [" ".join(c.split()) for c in clauses if c and not _CJK_OR_REF.search(c)]
    kept = [c for c in kept if c]
    return "; ".join(kept) if kept else None


def radical_number(rs_unicode: str) -> int:
    """Kangxi radical of a kRSUnicode value: "167.3" -> 167; "167'.3" (simplified form) -> 167."""
    return int(rs_unicode.split()[0].split(".")[0].rstrip("'\""))


def load_font(path: Path | None, size: int) -> ImageFont.FreeTypeFont:
    """The font file (for .ttc collections, the Simplified Chinese face when there is one)."""
    path = Path(path) if path else DEFAULT_FONT
    if not path.is_file():
        hint = (
            "install Debian's fonts-noto-cjk (apt-get install fonts-noto-cjk) or pass --font"
            if path == DEFAULT_FONT
            else "check --font"
        )
        raise GlyphEngineError(f"font {path} not found; {hint}.")
    faces = []
    for index in range(32 if path.suffix.lower() == ".ttc" else 1):
        try:
            font = ImageFont.truetype(str(path), size, index=index)
        except OSError:
            break
        faces.append(font)
        if " ".join(font.getname()[:1]) == DEFAULT_FONT_FACE:
            return font
    if not faces:
        raise GlyphEngineError(f"{path} is not a font PIL can read.")
    return faces[0]


def render(char: str, font: ImageFont.FreeTypeFont, resolution: int) -> np.ndarray:
    """One glyph, black on white, its ink box centred on a resolution x resolution canvas."""
    image = Image.new("L", (resolution, resolution), 255)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    origin = ((resolution - (right - left)) / 2 - left, (resolution - (bottom - top)) / 2 - top)
    draw.text(origin, char, font=font, fill=0)
    return np.asarray(image)


def _entries(unihan_dir: Path, limit: int | None) -> Iterator[tuple[int, str, int]]:
    readings, sources = unihan_dir / "Unihan_Readings.txt.bz2", unihan_dir / "Unihan_IRGSources.txt.bz2"
    for path in (readings, sources):
        if not path.is_file():
            raise GlyphEngineError(
                f"{path} not found; install Debian's unicode-data (apt-get install unicode-data) or pass --unihan."
            )
    definitions = read_unihan(readings, "kDefinition")
    radicals = read_unihan(sources, "kRSUnicode")
    count = 0
    for code in sorted(definitions):
        if not CODEPOINTS[0] <= code <= CODEPOINTS[1] or code not in radicals:
            continue
        caption = clean_definition(definitions[code])
        if caption is None:
            continue
        yield code, caption, radical_number(radicals[code])
        count += 1
        if limit is not None and count >= limit:
            return


def build_glyph_set(
    resolution: int = 128, font_path: Path | None = None, unihan_dir: Path = UNIHAN_DIR, limit: int | None = None
) -> GlyphSet:
    if resolution < 8:
        raise GlyphEngineError(f"--resolution must be at least 8 (got {resolution}).")
    font = load_font(font_path, round(FONT_SCALE * resolution))
    missing = render(chr(0x10FFFD), font, resolution)  # a code point no font has: the "tofu" box
    images, captions, codes, radicals = [], [], [], []
    for code, caption, radical in _entries(unihan_dir, limit):
        glyph = render(chr(code), font, resolution)
        if np.array_equal(glyph, missing) or glyph.min() == 255:
            continue  # the font lacks this character
        images.append(glyph)
        captions.append(caption)
        codes.append(code)
        radicals.append(radical)
    if not images:
        raise GlyphEngineError("no glyphs rendered: does the font cover CJK characters?")
    return GlyphSet(np.stack(images), np.array(captions), np.array(codes, np.int32), np.array(radicals, np.int16))


def save_glyph_set(glyphs: GlyphSet, path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                images=glyphs.images,
                captions=glyphs.captions,
                codepoints=glyphs.codepoints,
                radicals=glyphs.radicals,
            )


def load_glyph_set(path: Path) -> GlyphSet:
    try:
        with np.load(path, allow_pickle=False) as data:
            glyphs = GlyphSet(data["images"], data["captions"], data["codepoints"], data["radicals"])
    except FileNotFoundError:
        raise GlyphEngineError(f"dataset {path} not found; build it with `glyph-engine dataset -o {path}`.") from None
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise GlyphEngineError(f"{path} is not a glyph dataset ({e}).") from None
    problem = _shape_problem(glyphs)
    if problem:
        raise GlyphEngineError(
            f"{path} is not a usable glyph dataset ({problem}); rebuild it with `glyph-engine dataset`."
        )
    return glyphs


def _shape_problem(glyphs: GlyphSet) -> str | None:
    """What makes the arrays unusable for training, which indexes all four by glyph."""
    images = glyphs.images
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.dtype != np.uint8:
        return f"images must be square uint8 glyphs (N, H, H), not {images.dtype} {images.shape}"
    if any(a.ndim != 1 or len(a) != len(images) for a in (glyphs.captions, glyphs.codepoints, glyphs.radicals)):
        return f"captions, code points and radicals must be lists of one per image ({len(images)})"
    radicals = glyphs.radicals
    if not np.issubdtype(radicals.dtype, np.integer):
        return f"radicals must be whole numbers, not {radicals.dtype}"
    if len(radicals) and not 1 <= radicals.min() <= radicals.max() <= RADICALS:
        return f"radical numbers must be Kangxi radicals, 1 to {RADICALS}"
    return None
