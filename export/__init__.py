"""Export: each graph to ONNX, quantization, TensorRT plans and the engine folder's manifest."""
