"""The bundle: one output directory per run, written atomically, described by manifest.json.

Layout (see DESIGN.md)::

    <bundle>/manifest.json   adapter/ or adapters/<name>/   onnx/   reports/

New bundles are built in a temporary sibling directory and renamed into place
at the end (:func:`atomic_directory`); files added to an existing bundle are
written to a temporary name and renamed (:func:`atomic_file`). Nothing is ever
left half-written, and nothing is overwritten without ``force``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Iterator

from lora_edge.errors import BundleError

MANIFEST_FILE = "manifest.json"
ONNX_DIR = "onnx"
REPORTS_DIR = "reports"
TRACKED_LIBRARIES = ("lora-edge", "torch", "transformers", "peft", "onnx", "onnxruntime",
                     "onnxruntime-gpu", "onnxscript", "safetensors")


@contextlib.contextmanager
def atomic_directory(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` when the block succeeds.

    Raises BundleError when ``target`` exists and ``force`` is false. On any
    exception the temporary directory is removed and ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and not force:
        raise BundleError(f"'{target}' already exists", "--out", "pass --force to replace it or choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; it replaces ``target`` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, target)


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_file(path) as staging:
        staging.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape an export, plus Python and platform."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def require_bundle(path: Path) -> Path:
    """Check that ``path`` is a bundle directory (has a manifest) and return it."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        raise BundleError(f"'{path}' is not a lora-edge bundle (no {MANIFEST_FILE})", path,
                          "give a directory written by lora-edge export")
    return path


def read_manifest(bundle: Path) -> dict:
    """Load a bundle's manifest.json."""
    path = require_bundle(bundle) / MANIFEST_FILE
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"manifest is not valid JSON ({exc.msg})", path, "re-run lora-edge export") from exc


def update_manifest(bundle: Path, **sections) -> dict:
    """Merge top-level ``sections`` into a bundle's manifest and rewrite it atomically."""
    manifest = read_manifest(bundle)
    manifest.update(sections)
    write_json(Path(bundle) / MANIFEST_FILE, manifest)
    return manifest
