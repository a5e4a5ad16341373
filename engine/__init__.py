"""glyph-engine: fast inference for glyffuser-style text-to-glyph diffusion models."""

__version__ = "0.1.0"
