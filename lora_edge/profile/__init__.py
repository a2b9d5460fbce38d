"""Timing graphs on device targets; merged vs branched vs hot-swap; rank sweeps.

See docs/ARCHITECTURE.md, "Layers and what each may import"."""
