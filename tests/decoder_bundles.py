"""Causal-LM bundles of the tiny decoders, exported once per test session and shared by the decoder tests.

Each exported graph costs seconds, so the set is planned to cover every
architecture x form exactly once:

* gpt2: merged, branched, hotswap through the CLI (``lora-edge export --task causal-lm``);
* qwen2, mistral: merged, branched, hotswap through ``export_bundle``;
* llama: merged and branched with adapter ``a``, and a hot-swap bundle serving
  ``a`` and ``b`` (a different rank and seed) for the adapter-switching tests.

Adapters use a large alpha so that greedy tokens differ from the base model's
(the tests assert that, so a no-op adapter cannot pass).

Under pytest-xdist the workers share the bundles: the first worker that needs
one exports it under a file lock in the run's common temporary directory, the
others wait for it and reuse it (the tiny models and adapters are seeded, so
every worker's references are the same models).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from lora_edge.core.choices import Form

ARCHS = ("llama", "qwen2", "gpt2", "mistral")
FORMS = (Form.MERGED, Form.BRANCHED, Form.HOTSWAP)
STRONG_ALPHA = 32.0
SECOND_ADAPTER = dict(rank=2, alpha=STRONG_ALPHA, seed=7)
_BUILT: dict[tuple, Path] = {}


def adapter_dirs(arch: str, tiny_adapter) -> dict[str, Path]:
    """Adapter name -> directory: ``a`` for every arch, plus ``b`` for llama."""
    dirs = {"a": tiny_adapter(arch, alpha=STRONG_ALPHA)}
    if arch == "llama":
        dirs["b"] = tiny_adapter(arch, **SECOND_ADAPTER)
    return dirs


def shared_root(tmp_path_factory) -> Path:
    """A directory every xdist worker of this run sees (the workers' temp dirs are its siblings)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "decoder-bundles"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _export(out: Path, model_dir: Path, adapters: dict[str, Path], forms: list[str], via_cli: bool) -> Path:
    key = (str(out),)
    if key in _BUILT:
        return _BUILT[key]
    with _locked(out.parent / f"{out.name}.lock"):
        if not (out / "manifest.json").is_file():  # bundles are renamed into place complete
            _export_now(out, model_dir, adapters, forms, via_cli)
    _BUILT[key] = out
    return out


def _export_now(out: Path, model_dir: Path, adapters: dict[str, Path], forms: list[str], via_cli: bool) -> None:
    if via_cli:
        from lora_edge.cli import main

        args = ["export", "--task", "causal-lm", "--model", str(model_dir), "--forms", ",".join(forms),
                "--out", str(out)]
        for name, path in adapters.items():
            args += ["--adapter", f"{name}={path}"]
        try:
            main(args)
        except SystemExit as exc:
            assert exc.code in (0, None), f"lora-edge export exited with {exc.code}"
    else:
        from lora_edge.core.adapters import AdapterRef
        from lora_edge.export.bundle import export_bundle

        export_bundle(model_dir, [AdapterRef(name, path) for name, path in adapters.items()], forms, out,
                      task="causal-lm", progress=lambda message: None)


def bundle_for(arch: str, form: Form, root: Path, tiny_model, tiny_adapter) -> tuple[Path, str]:
    """(bundle, graph name) holding ``form`` of ``arch`` with adapter ``a`` (exported on first use)."""
    adapters = adapter_dirs(arch, tiny_adapter)
    model_dir = tiny_model(arch)
    if arch == "llama":
        if form is Form.HOTSWAP:
            return _export(root / "llama-hotswap", model_dir, adapters, ["hotswap"], False), "hotswap.fp32"
        return _export(root / "llama", model_dir, {"a": adapters["a"]}, ["merged", "branched"], False), \
            f"{form.value}.fp32"
    bundle = _export(root / arch, model_dir, adapters, [f.value for f in FORMS], via_cli=(arch == "gpt2"))
    return bundle, f"{form.value}.fp32"
