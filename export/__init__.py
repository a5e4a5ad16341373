"""ONNX and TensorRT export of glyffuser components (the export issue fills this in)."""
