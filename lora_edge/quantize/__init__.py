"""fp16 / int8 / int4 graphs from the fp32 ones, LoRA-aware.

See docs/ARCHITECTURE.md, "Layers and what each may import"."""
