"""The exporters: checkpoints to model bundles (ONNX graphs + spec.json), TensorRT engines, Triton repos."""
