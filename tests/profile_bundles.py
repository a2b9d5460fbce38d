"""Small bundles for the profiler and comparison tests, built once per test session.

Until the exporter's ``export_bundle`` lands, the graphs are written here with
torch.onnx's TorchScript exporter (fast, and the profiler only needs runnable
graphs of each form); the manifest follows the shared bundle schema.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lora_edge.bundle import Form, GraphRecord, Precision, write_json

ADAPTER_NAME = "tiny"
ENCODER_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


class _Logits:
    """Wrap a seq-cls model so that export sees positional inputs and one logits output."""

    def __new__(cls, model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).logits

        return Wrapper(model)


def _export(model, path: Path) -> None:
    import torch

    ids = torch.randint(5, 1000, (2, 16))
    torch.onnx.export(_Logits(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(path),
                      input_names=ENCODER_INPUTS, output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={name: {0: "batch", 1: "sequence"} for name in ENCODER_INPUTS})


def build_encoder_bundle(model_dir: Path, adapter_dir: Path, out: Path, int8: bool = True) -> Path:
    """A seq-cls bundle with merged.fp32, branched.fp32 (and their int8-dynamic copies) for ``adapter_dir``."""
    import warnings

    from lora_edge.adapters import AdapterRef, load_reference, read_adapter_config
    from lora_edge.merge import merge_adapter

    onnx_dir = out / "onnx"
    onnx_dir.mkdir(parents=True)
    shutil.copytree(adapter_dir, out / "adapter")
    shutil.copy(model_dir / "config.json", onnx_dir / "config.json")
    reference = load_reference(model_dir, AdapterRef(ADAPTER_NAME, adapter_dir))
    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for form, model in ((Form.MERGED, merge_adapter(reference)), (Form.BRANCHED, reference)):
            file = f"onnx/{form.value}.fp32.onnx"
            _export(model, out / file)
            records.append(GraphRecord(GraphRecord.graph_name(form, Precision.FP32), file, form, Precision.FP32,
                                       "seq-cls", adapter=ADAPTER_NAME))
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        for record in list(records):
            file = f"onnx/{record.form.value}.int8-dynamic.onnx"
            quantize_dynamic(str(out / record.file), str(out / file), weight_type=QuantType.QInt8)
            records.append(GraphRecord(GraphRecord.graph_name(record.form, Precision.INT8_DYNAMIC), file,
                                       record.form, Precision.INT8_DYNAMIC, "seq-cls", adapter=ADAPTER_NAME,
                                       source=record.name))
    manifest = {"lora_edge_version": "test", "created": "", "libraries": {}, "seed": 0,
                "model": {"path": str(model_dir), "sha256": "", "task": "seq-cls", "default": False},
                "adapters": [{"name": ADAPTER_NAME, "source": str(adapter_dir), "sha256": "", "bundle_dir": "adapter",
                              "lora_config": read_adapter_config(adapter_dir), "labels": None, "data": None}],
                "graphs": [record.to_json() for record in records], "recipe": None}
    write_json(out / "manifest.json", manifest)
    return out


def copy_bundle(bundle: Path, out: Path) -> Path:
    """A private copy of a shared bundle (tests that write reports must not race each other)."""
    shutil.copytree(bundle, out)
    return out


def manifest_of(bundle: Path) -> dict:
    """The bundle's manifest as a dict."""
    return json.loads((bundle / "manifest.json").read_text())
