"""The accuracy gate: every graph against the PyTorch reference, with thresholds.

See docs/ARCHITECTURE.md, "Layers and what each may import"."""
