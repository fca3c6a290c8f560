"""GLM checkpoint -> ONNX -> quantize -> validate -> bundle."""
