"""A bundle exported with quantized precisions only: the fp32 graphs are intermediates, not kept.

They are written to :func:`lora_edge.core.bundle.intermediate_directory` (tmpfs
when it has room), verified against PyTorch as always, quantized, and left out:
the quantized graphs must be those of a bundle that keeps fp32, byte for byte.
"""

from __future__ import annotations

import json

import pytest

from lora_edge.core import bundle as core_bundle
from lora_edge.core.adapters import AdapterRef
from lora_edge.core.bundle import ONNX_DIR, intermediate_directory
from lora_edge.core.manifest import list_graphs
from lora_edge.export.bundle import export_bundle
from lora_edge.quantize.quantizer import quantize_bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_model, tiny_adapter):
    """(int4-only bundle, fp32 + int4 bundle, the stand-in memory file system), tiny llama merged + hot-swap."""
    root = tmp_path_factory.mktemp("int4-only")
    memory_fs = root / "shm"
    memory_fs.mkdir()
    patch = pytest.MonkeyPatch()
    patch.setattr(core_bundle, "MEMORY_FS", memory_fs)
    patch.setattr(core_bundle, "MEMORY_FS_MARGIN", 0)
    from lora_edge.quantize import decoder

    hits = []  # the fusion checks that found export's outputs of their source graph (no session of their own)
    remembered = decoder.remembered_outputs
    patch.setattr(decoder, "remembered_outputs", lambda *args: hits.append(remembered(*args)) or hits[-1])
    adapter = AdapterRef("a", tiny_adapter("llama", alpha=32.0))
    out = {}
    try:
        for name, precisions in (("int4", ["int4"]), ("both", ["fp32", "int4"])):
            out[name] = export_bundle(tiny_model("llama"), [adapter], ["merged", "hotswap"], root / name,
                                      task="causal-lm", precisions=precisions, progress=lambda m: None,
                                      quantize=quantize_bundle)
    finally:
        patch.undo()
    assert len(hits) == 4 and all(found is not None for found in hits)  # 2 bundles x (merged, hotswap)
    return out["int4"], out["both"], memory_fs


def test_no_fp32_graph_is_kept_and_nothing_is_left_behind(bundles):
    int4_only, _, memory_fs = bundles
    records = list_graphs(int4_only)
    assert sorted(r.name for r in records) == ["hotswap.int4", "merged.int4"]
    assert not list((int4_only / ONNX_DIR).glob("*.fp32.onnx*"))
    assert not list(memory_fs.iterdir())  # the intermediate directory is gone
    assert (int4_only / ONNX_DIR / "adapters" / "a.onnx_adapter").is_file()
    config = json.loads((int4_only / ONNX_DIR / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "hotswap.int4.onnx"


def test_quantized_graphs_equal_those_of_a_bundle_keeping_fp32(bundles):
    """Same sources, same quantizer: the int4 files are byte for byte those quantized from kept fp32 graphs."""
    int4_only, both, _ = bundles
    for name in ("merged.int4.onnx", "hotswap.int4.onnx"):
        assert (int4_only / ONNX_DIR / name).read_bytes() == (both / ONNX_DIR / name).read_bytes(), name


def test_quantizing_with_the_outputs_export_remembered_equals_quantizing_afresh(bundles, tmp_path):
    """Export's verification session ran the fusion check's feeds (no session of the fp32 graph in quantize):
    quantizing a copy of the fp32 graph in a fresh session gives the same int4 graph and the same check figures."""
    import shutil

    from lora_edge.core.manifest import Manifest
    from lora_edge.quantize.quantizer import quantize_graph

    _, both, _ = bundles
    (tmp_path / ONNX_DIR).mkdir()
    shutil.copy(both / ONNX_DIR / "config.json", tmp_path / ONNX_DIR / "config.json")
    records = {r.name: r for r in Manifest.read(both).graphs}
    for form in ("merged", "hotswap"):
        source = shutil.copy(both / ONNX_DIR / f"{form}.fp32.onnx", tmp_path / ONNX_DIR / f"{form}.fp32.onnx")
        result = quantize_graph(source, tmp_path / ONNX_DIR / f"{form}.int4.onnx", "int4", task="causal-lm")
        assert result.path.read_bytes() == (both / ONNX_DIR / f"{form}.int4.onnx").read_bytes(), form
        fusion = records[f"{form}.int4"].extra["fusion"]
        assert fusion["group_query_attention"] > 0 and "dropped" not in fusion
        assert result.fusion["max_abs_diff"] == fusion["max_abs_diff"], form


def test_the_intermediates_verification_is_recorded(bundles):
    """Each quantized graph's record keeps what its fp32 source was verified at (it was, against PyTorch)."""
    int4_only, both, _ = bundles
    fp32 = {r.name: r for r in list_graphs(both) if r.precision.value == "fp32"}
    for record in list_graphs(int4_only):
        verified = record.extra["source_verified"]
        assert 0 <= verified["max_abs_diff"] <= 1e-4, record.name  # export's fp32 tolerance
        assert verified["max_abs_diff"] == pytest.approx(fp32[record.source].extra["max_abs_diff"], abs=1e-7)
    hotswap = next(r for r in list_graphs(int4_only) if r.form.value == "hotswap")
    assert set(hotswap.extra["source_verified"]["max_abs_diff_by_adapter"]) == {"base", "a"}


def test_an_int4_only_bundle_generates(bundles):
    """The hot-swap int4 graph runs with its adapter from the bundle, as in a bundle that keeps fp32."""
    from lora_edge.runtime.bundle_generate import generate_from_bundle

    int4_only, both, _ = bundles
    prompts = ["hello there", "a b c"]
    ours = generate_from_bundle(int4_only, "hotswap.int4", prompts, adapter="a", max_new_tokens=4)
    theirs = generate_from_bundle(both, "hotswap.int4", prompts, adapter="a", max_new_tokens=4)
    assert ours.result.new_ids == theirs.result.new_ids
    assert all(len(ids) > 0 for ids in ours.result.new_ids)


def test_intermediate_directory_falls_back_beside_the_bundle(tmp_path, monkeypatch):
    """Without a memory file system (or without room there) the directory is made inside ``beside``."""
    beside = tmp_path / "staging"
    beside.mkdir()
    with intermediate_directory(1 << 20, beside, memory_fs=tmp_path / "missing") as directory:
        assert directory.parent == beside and directory.is_dir()
    assert not directory.exists()
    with intermediate_directory(1 << 60, beside, memory_fs=tmp_path) as directory:  # no room for an exabyte
        assert directory.parent == beside
    roomy = tmp_path / "roomy"
    roomy.mkdir()
    monkeypatch.setattr(core_bundle, "MEMORY_FS_MARGIN", 0)
    with intermediate_directory(1 << 10, beside, memory_fs=roomy) as directory:
        assert directory.parent == roomy
    assert not list(roomy.iterdir())


def test_an_encoder_bundle_without_fp32_keeps_its_fused_int8_graph(tmp_path, tiny_model, tiny_adapter):
    """Encoders too (their fp32 graphs are fused and verified at export, then quantized from the intermediate)."""
    from lora_edge.runtime.session import create_session

    out = export_bundle(tiny_model("bert"), [AdapterRef("a", tiny_adapter("bert"))], ["merged"], tmp_path / "b",
                        precisions=["int8-dynamic"], progress=lambda m: None, quantize=quantize_bundle)
    records = list_graphs(out)
    assert [r.name for r in records] == ["merged.int8-dynamic"]
    assert sorted(p.name for p in (out / ONNX_DIR).glob("*.onnx")) == ["merged.int8-dynamic.onnx"]
    assert 0 <= records[0].extra["source_verified"]["max_abs_diff"] <= 1e-4
    assert not (out / ONNX_DIR / "genai_config.json").exists()
    create_session(out / records[0].file)  # loads


def test_the_cli_keeps_only_the_precisions_asked_for(tmp_path, tiny_model, tiny_adapter):
    """`export --precisions int4` gives the same bundle as the Python call: no fp32 graph kept."""
    from cli_runner import exit_code_of

    out = tmp_path / "bundle"
    code = exit_code_of("export", "--model", str(tiny_model("llama")), "--adapter", f"a={tiny_adapter('llama')}",
                        "--forms", "merged", "--precisions", "int4", "--task", "causal-lm", "--out", str(out),
                        "--quiet")
    assert code == 0
    assert [r.name for r in list_graphs(out)] == ["merged.int4"]
    assert not list((out / ONNX_DIR).glob("*.fp32.onnx*"))
