"""`glyph-engine serve`: an HTTP API on Ray Serve that batches requests from many clients."""
