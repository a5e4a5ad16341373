"""Training, the glyph dataset and the radical evaluation: tools for making models.

The runtime (generate, export, serve) never imports this subpackage.
"""
