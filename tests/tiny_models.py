"""Tiny random models and adapters for tests: a thin re-export of :mod:`lora_edge.core.tiny`.

The builders live in the package so that recipes can name a tiny model
(``model = "tiny:llama"``); tests keep importing them from here.
"""

from lora_edge.core.choices import TINY_DECODERS as DECODERS, TINY_ENCODERS as ENCODERS  # noqa: F401
from lora_edge.core.tiny import (LORA_TARGETS, TINY_LABELS, VOCAB_SIZE, tiny_config,  # noqa: F401
                                 build_random_adapter, build_tiny_model)
