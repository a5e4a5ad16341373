"""Inference backends: each loads a model and runs it behind `glyph_engine.backends.base.Backend`.

They only load and run: building (the OpenVINO models, the int8 gate) is
`glyph_engine.openvino_build`'s and `glyph_engine.export`'s; choosing and opening one by name
is `glyph_engine.backend_factory`'s; which precisions each runs is `glyph_engine.precision`'s.
"""
