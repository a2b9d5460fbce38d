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

# The stage folders in flow order: a module may import its own folder and earlier ones only.
LAYERS = ["core", "runtime", "train", "export", "quantize", "profile", "check", "pipeline"]
SHELL = ["__init__", "__main__", "cli"]  # the package's top level: the public API and the command line

# (importer, imported): upward arrows that exist today; remove an entry when its arrow goes.
KNOWN_UPWARD: set[tuple[str, str]] = set()  # none left: keep it so

MAX_DEPTH = 9  # the longest chain of internal imports, in modules (__main__ -> cli -> ... -> core.errors): 8 levels


def module_name(path: Path) -> str:
    """``core.errors`` for lora_edge/core/errors.py, ``cli`` for lora_edge/cli.py."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def modules() -> dict[str, Path]:
    """Every module by dotted name: the top level's files (``__init__`` too) and the stage folders' modules."""
    return {module_name(path): path for path in PACKAGE.rglob("*.py")
            if path.parent == PACKAGE or path.name != "__init__.py"}


def layer_of(module: str) -> int:
    """The flow position of a module's folder; the top level comes after every stage."""
    folder = module.split(".")[0]
    return LAYERS.index(folder) if folder in LAYERS else len(LAYERS)


def internal_imports(path: Path, known: set[str]) -> set[str]:
    """The lora_edge modules a file imports, at any place in it (lazy and type-only imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lora_edge":
            base = node.module.split(".", 1)[1] if "." in node.module else ""
            for alias in node.names:  # `from lora_edge.core import errors` names a module, not an attribute
                candidate = f"{base}.{alias.name}" if base else alias.name
                found.add(candidate if candidate in known else base)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("lora_edge."))
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: internal_imports(path, set(known)) - {name} for name, path in known.items()}


def test_every_module_sits_in_a_stage_folder():
    stray = sorted(name for name in modules() if "." not in name and name not in SHELL)
    assert not stray, f"move these modules into a stage folder ({', '.join(LAYERS)}): {stray}"
    folders = sorted({name.split(".")[0] for name in modules() if "." in name} - set(LAYERS))
    assert not folders, f"add these folders to LAYERS here and to docs/ARCHITECTURE.md: {folders}"


def test_no_module_imports_a_later_layer():
    upward = {(module, imported) for module, imports in import_graph().items() for imported in imports
              if layer_of(imported) > layer_of(module)}
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
    from lora_edge.core.errors import BundleError

    bundle = tmp_path / "empty"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"model": {"task": "seq-cls"},
                                                      "adapters": [{"name": "a", "bundle_dir": "adapter"}],
                                                      "graphs": []}))
    for command in (["profile", str(bundle), "--device", "host-cpu"], ["check", str(bundle)]):
        assert exit_code_of(*command) == BundleError.exit_code, command
        assert "lists no graphs" in capsys.readouterr().err
