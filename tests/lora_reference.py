"""An independent oracle for PEFT's LoRA scaling, read from adapter_config.json (tests only).

Tests check merged weights and hot-swap tensors against this, computed from the
files rather than from the PEFT layers the package reads, so that a mistake in
the package's reading of PEFT cannot hide itself.
"""

from __future__ import annotations

import math


def lora_scaling(config: dict, module_name: str) -> tuple[int, float]:
    """(rank, scale) PEFT uses for ``module_name``, honouring rank/alpha patterns and rsLoRA.

    Pattern keys match like PEFT's: a key matches when the module name ends with it
    (as a dotted suffix) or equals it.
    """
    import re

    def pick(pattern: dict, default):
        for key, value in (pattern or {}).items():
            if re.match(rf"(.*\.)?({key})$", module_name):
                return value
        return default

    rank = pick(config.get("rank_pattern"), config["r"])
    alpha = pick(config.get("alpha_pattern"), config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return int(rank), float(scale)
