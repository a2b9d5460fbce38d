"""Shared vocabulary: errors, enums, names, the manifest and bundle files, data, recipes, models. Imports no stage.

See docs/ARCHITECTURE.md, "Layers and what each may import"."""
