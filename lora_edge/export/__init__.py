"""PyTorch -> ONNX: one trace, the three forms, the bundle, the verified CPU graph rewrites.

See docs/ARCHITECTURE.md, "Layers and what each may import"."""
