"""Olive's adapter writer, reproduced for tests: what ``olive convert-adapters`` writes for a PEFT adapter.

Copied in behaviour, line by line, from olive-ai 0.13.0 (identical to
github.com/microsoft/Olive at ee6f40f): ``ConvertAdaptersCommand.run`` and
``int4_block_quant`` in olive/cli/convert_adapters.py, and the ONNX_ADAPTER
branch of ``save_weights`` in olive/common/utils.py. olive-ai itself needs
torch from the package index (a CUDA build), so the fast tests use this copy;
``test_adapter_layout.py::test_real_olive_writes_what_the_reference_writes``
checks it against the real command when ``LORA_EDGE_OLIVE_PYTHON`` names a
Python that has olive-ai.
"""

from __future__ import annotations

import math
from pathlib import Path


def olive_convert_adapters(adapter_path: Path, output_path: Path, dtype: str = "float32",
                           quantize_int4: bool = False, block_size: int = 32) -> Path:
    """``olive convert-adapters -a ADAPTER_PATH -o OUTPUT_PATH [--dtype] [--quantize_int4]`` (onnx_adapter)."""
    import onnxruntime as ort
    import torch
    from peft import LoraConfig, load_peft_weights

    lora_config = LoraConfig.from_pretrained(str(adapter_path))
    if getattr(lora_config, "use_rslora", False):
        scaling = lora_config.lora_alpha / math.sqrt(lora_config.r)
    else:
        scaling = lora_config.lora_alpha / lora_config.r
    adapter_weights = load_peft_weights(str(adapter_path), device="cpu")
    transformed_weights = {}
    for name, value in adapter_weights.items():
        new_name = name.replace("base_model.model.model", "model")
        float_weight = value.to(getattr(torch, dtype)).numpy().transpose().copy()
        if "lora_B" in new_name:
            float_weight *= scaling
        if not quantize_int4:
            transformed_weights[new_name] = float_weight
        else:
            weight, scale, _ = int4_block_quant(float_weight, block_size, True)
            transformed_weights[new_name.replace(".weight", ".quant.weight")] = weight
            transformed_weights[new_name.replace(".weight", ".quant.scale")] = scale
    path = Path(str(output_path) if str(output_path).endswith(".onnx_adapter") else f"{output_path}.onnx_adapter")
    adapter_format = ort.AdapterFormat()
    adapter_format.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in transformed_weights.items()})
    adapter_format.export_adapter(str(path))
    return path


def int4_block_quant(float_weight, block_size: int, is_symmetric: bool):
    """Olive's blockwise int4 quantization of one [rows, cols] weight (blocks run down each column)."""
    import numpy as np
    from onnxruntime.quantization.matmul_nbits_quantizer import quantize_matmul_4bits

    rows, cols = float_weight.shape
    blob_size = block_size // 2
    k_blocks = (rows + block_size - 1) // block_size
    pad_len = k_blocks * block_size - rows
    if pad_len > 0:
        float_weight = np.pad(float_weight, ((0, pad_len), (0, 0)), "constant")
    packed = np.zeros((cols, k_blocks, blob_size), dtype="uint8")
    scales = np.zeros((cols * k_blocks), dtype=float_weight.dtype)
    zero_point = np.zeros(cols * ((k_blocks + 1) // 2), dtype="uint8")
    quantize_matmul_4bits(packed, float_weight, scales, zero_point, block_size, cols, rows, is_symmetric)
    return packed, scales, zero_point
