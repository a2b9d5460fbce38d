"""Training LoRA adapters (PEFT + transformers' Trainer) and what they write.

See docs/ARCHITECTURE.md, "Layers and what each may import"."""
