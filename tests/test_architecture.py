"""The layer rule of docs/ARCHITECTURE.md: a module imports its own layer and lower layers only.

The import graph is read from the source (no imports run), so a new upward
arrow fails here with the two modules named. ``KNOWN_UPWARD`` lists the arrows
that exist today and are to be removed; it may only shrink.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lora_edge"

LAYERS = {
    0: ["errors", "names", "models", "bundle", "manifest", "data", "metrics", "flops", "report", "thresholds", "tiny",
        "adapters", "recipe", "config_fields", "choices", "model_tasks", "onnx_spec", "toml_compat", "console", "chat",
        "gguf", "pull", "decoder_io", "fake_quant", "__init__"],
    1: ["runtime", "feeds", "measure", "infer", "generate", "tokenizer", "interleave", "adapter_layout"],
    2: ["train", "train_io", "adapter_card"],
    3: ["exporter", "decoder", "merge", "hotswap", "forms", "export_bundle", "genai_config", "export_fusion", "quantize_fusion",
        "quantize_prepare"],
    4: ["quantize", "quantize_lora", "quantize_methods", "quantize_decoder"],
    5: ["devices", "eager", "profile", "profile_report", "compare", "sweep"],
    6: ["check", "check_data", "check_metrics", "check_report", "check_tasks", "lm_metrics"],
    7: ["pipeline", "pipeline_report", "cli", "__main__"],
}

# (importer, imported): upward arrows that exist today; remove an entry when its arrow goes.
KNOWN_UPWARD = {
    ("export_bundle", "quantize"),  # export quantizes when asked to
}

MAX_DEPTH = 14  # the longest chain of internal imports (cli -> pipeline -> ... -> models -> pull -> gguf); goal 8


def layer_of() -> dict[str, int]:
    return {module: layer for layer, modules in LAYERS.items() for module in modules}


def internal_imports(path: Path) -> set[str]:
    """The lora_edge modules a file imports, at any place in it (lazy imports count)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lora_edge":
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lora_edge."))
    return found


def import_graph() -> dict[str, set[str]]:
    return {path.stem: internal_imports(path) - {path.stem} for path in PACKAGE.glob("*.py")}


def test_every_module_has_a_layer():
    missing = sorted(set(import_graph()) - set(layer_of()))
    assert not missing, f"add these modules to a layer in docs/ARCHITECTURE.md and LAYERS here: {missing}"


def test_no_module_imports_a_later_layer():
    layers = layer_of()
    upward = {(module, imported) for module, imports in import_graph().items() for imported in imports
              if layers.get(imported, -1) > layers.get(module, 99)}
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, f"upward imports (a stage importing a later stage): {new}"
    gone = sorted(KNOWN_UPWARD - upward)
    assert not gone, f"these known upward imports are gone; remove them from KNOWN_UPWARD: {gone}"


def test_import_depth_does_not_grow():
    graph = import_graph()

    @functools.lru_cache(maxsize=None)
    def depth(module: str, seen: frozenset = frozenset()) -> int:
        if module in seen:
            return 0
        return 1 + max((depth(m, seen | {module}) for m in graph.get(module, ())), default=0)

    deepest = max(graph, key=depth)
    assert depth(deepest) <= MAX_DEPTH, f"import chain from {deepest} is {depth(deepest)} deep (at most {MAX_DEPTH})"


def test_a_bundle_without_graphs_is_the_same_error_in_every_command(tmp_path, capsys):
    """One condition, one error class: profile and check both refuse it as a BundleError (exit 9)."""
    import json

    from cli_runner import exit_code_of
    from lora_edge.errors import BundleError

    bundle = tmp_path / "empty"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"model": {"task": "seq-cls"},
                                                      "adapters": [{"name": "a", "bundle_dir": "adapter"}],
                                                      "graphs": []}))
    for command in (["profile", str(bundle), "--device", "host-cpu"], ["check", str(bundle)]):
        assert exit_code_of(*command) == BundleError.exit_code, command
        assert "lists no graphs" in capsys.readouterr().err
