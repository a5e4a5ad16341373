"""Denoiser backends; each one implements `glyph_engine.denoiser.Denoiser`."""
