"""Building and opening inference engines: ONNX Runtime sessions and TensorRT plans."""
