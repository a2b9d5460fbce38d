"""Recipes through every stage, and the run report.

See docs/ARCHITECTURE.md, "Layers and what each may import"."""
