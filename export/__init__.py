"""Export of glyffuser components: ONNX files, checked against PyTorch, in an artifact folder."""
