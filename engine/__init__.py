"""glyph-engine: fast inference for glyffuser-style text-to-glyph diffusion models.

    import glyph_engine
    pipe = glyph_engine.load()            # or load("ckpt.pt", backend=..., precision=...)
    glyphs = pipe("metal", n=16, seed=0)  # .array, .images, .grid(), .save("glyphs.png"), .metadata

The API (`glyph_engine.api`, which loads torch) is imported on first use, so that
`import glyph_engine` stays light for the CLI, which reads only the version from here.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["GlyphEngineError", "Glyphs", "Pipeline", "Request", "__version__", "load"]

if TYPE_CHECKING:
    from glyph_engine.api import Glyphs, Pipeline, Request, load
    from glyph_engine.errors import GlyphEngineError


def __getattr__(name: str) -> object:
    if name in ("Glyphs", "Pipeline", "Request", "load"):
        from glyph_engine import api

        return getattr(api, name)
    if name == "GlyphEngineError":
        from glyph_engine.errors import GlyphEngineError

        return GlyphEngineError
    raise AttributeError(f"module 'glyph_engine' has no attribute {name!r}")
