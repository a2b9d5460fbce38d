"""`python -m lora_edge` (and `torchrun -m lora_edge`) run the CLI."""

from lora_edge.cli import main

if __name__ == "__main__":
    main()
