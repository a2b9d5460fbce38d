"""ONNX Runtime only (no torch at import): sessions, feeds, timing, inference and generation on graphs.

See docs/ARCHITECTURE.md, "Layers and what each may import"."""
