"""The bundle: one output directory per run, written atomically, described by manifest.json.

Layout (docs/ARCHITECTURE.md, "The bundle")::

    <bundle>/manifest.json   adapter/ or adapters/<name>/   onnx/   reports/

New bundles are built in a temporary sibling directory and renamed into place
at the end (:func:`atomic_directory`); files added to an existing bundle are
written to a temporary name and renamed (:func:`atomic_file`). Nothing is ever
left half-written, and nothing is overwritten without ``force``. The manifest
itself is read and written through :mod:`lora_edge.core.manifest`.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator

from lora_edge.core.errors import BundleError, ConfigError

MANIFEST_FILE = "manifest.json"
ONNX_DIR = "onnx"
REPORTS_DIR = "reports"
TRACKED_LIBRARIES = ("lora-edge", "torch", "transformers", "peft", "onnx", "onnxruntime",
                     "onnxruntime-gpu", "onnxscript", "safetensors")


# Staging names carry their owner: ".<name>.tmp-<pid>.<host>-<random>" (also ".old-" while a replaced
# directory is being removed), <host> a hash of the host name. A later run on the same host that writes beside
# them removes those whose process is gone; another host's (a shared file system, a container) are left alone.
STAGING_PATTERN = re.compile(r"^\..+\.(?:tmp|old)-(?P<pid>\d+)\.(?P<host>[0-9a-f]{8})-[0-9a-f]+$")


def host_tag() -> str:
    """This host's tag in staging names: a hash of the host name (8 hex digits)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


LOCK_SUFFIX = ".lock"


def _process_alive(pid: int) -> bool:
    """True when ``pid`` runs on this host (a zombie counts as dead: it will never finish its rename)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def remove_stale_staging(directory: Path) -> list[Path]:
    """Remove the staging files and directories in ``directory`` whose owner process is dead; return them."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = STAGING_PATTERN.match(entry.name)
        if not match or match["host"] != host_tag() or _process_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def _staging_name(target: Path, kind: str = "tmp") -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}.{host_tag()}-{secrets.token_hex(4)}"


def _prepare_parent(target: Path, option: str) -> None:
    """Create ``target``'s parent directory (a clear error when a path component is a file) and sweep it."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"cannot create '{target}': a part of its path is a file", option,
                          "choose a path whose parent directories are directories") from None
    except OSError as exc:
        raise ConfigError(f"cannot create '{target}' ({exc.strerror})", option,
                          "choose a writable location") from None
    remove_stale_staging(target.parent)


def require_writable_file_path(path: Path, option: str) -> Path:
    """Check, before any work, that a file can be written at ``path`` (ConfigError naming ``option`` if not)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"'{path}' is a directory", option, "give a file path")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"cannot create '{path}': '{ancestor}' is a file", option,
                          "choose a path whose parent directories are directories")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create '{path}': '{ancestor}' is not writable", option,
                          "choose a writable location")
    return path


@contextlib.contextmanager
def bundle_lock(target: Path, wait: bool = False, option: str = "--out") -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``target`` while writing it: one writer at a time.

    Another writer (without ``wait``) gets a BundleError instead of a mixed
    result. The lock is an ``flock``, so a killed holder releases it at once.
    """
    target = Path(target)
    _prepare_parent(target, option)
    path = target.parent / f".{target.name}{LOCK_SUFFIX}"
    for _ in range(20):
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise ConfigError(f"cannot create the lock file ({exc.strerror})", path, "choose a writable location") \
                from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(handle)
            raise BundleError(f"another lora-edge process is writing '{target}'", path,
                              "wait for it to finish, or write to another path") from None
        try:  # the holder before us may have removed the file: then lock the new one
            same = os.stat(path).st_ino == os.fstat(handle).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(handle)
    else:
        raise BundleError("could not take the lock", path, "remove the lock file if no lora-edge process runs")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(handle)


@contextlib.contextmanager
def staging_directory(target: Path, option: str = "--out") -> Iterator[Path]:
    """A new empty directory beside ``target``, named for this process, removed when the block ends."""
    target = Path(target)
    _prepare_parent(target, option)
    staging = _staging_name(target)
    staging.mkdir()  # an ordinary mkdir: the user's umask decides the mode
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: Path, force: bool = False, wait: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` when the block succeeds.

    Raises BundleError when ``target`` exists and ``force`` is false, or when
    another process is writing ``target`` (unless ``wait``: then it waits its
    turn). On any exception the temporary directory is removed and ``target``
    is untouched. Staging left by killed processes beside ``target`` is removed.
    """
    target = Path(target)
    if target.exists() and not force:
        raise BundleError(f"'{target}' already exists", "--out", "pass --force to replace it or choose another path")
    with bundle_lock(target, wait), staging_directory(target) as staging:
        yield staging
        old = None
        if target.exists() and not force:  # written by another process since the check above
            raise BundleError(f"'{target}' was created while this run wrote it", "--out",
                              "pass --force to replace it or choose another path")
        if target.exists():
            old = _staging_name(target, "old")
            target.rename(old)
        staging.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# Intermediate files (graphs a bundle does not keep) go to this RAM-backed file system when it has room; off
# unless LORA_EDGE_MEMORY_FS names one (e.g. /dev/shm): tmpfs files hold RAM that no process's RSS shows, so an
# export's memory figure would leave them out.
MEMORY_FS = Path(os.environ["LORA_EDGE_MEMORY_FS"]) if os.environ.get("LORA_EDGE_MEMORY_FS") else None
# Memory the rest of the process needs beside intermediate files there (an LLM export peaks ~1.3 GB).
MEMORY_FS_MARGIN = 2 << 30


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where there is no such file."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _has_room(memory_fs: Path, size_bytes: int) -> bool:
    """True when ``memory_fs`` is a writable directory and both it and the machine's available memory hold
    ``size_bytes`` plus :data:`MEMORY_FS_MARGIN`."""
    try:
        stat = os.statvfs(memory_fs)
    except OSError:  # no such file system here
        return False
    free, available = stat.f_bavail * stat.f_frsize, _available_memory()
    return memory_fs.is_dir() and os.access(memory_fs, os.W_OK) and available is not None \
        and min(free, available) >= size_bytes + MEMORY_FS_MARGIN


@contextlib.contextmanager
def intermediate_directory(size_bytes: int, beside: Path, memory_fs: Path | None = None) -> Iterator[Path]:
    """A scratch directory for ``size_bytes`` of intermediate files, removed when the block ends.

    On ``memory_fs`` (default :data:`MEMORY_FS`: none unless ``LORA_EDGE_MEMORY_FS`` names a tmpfs) when it
    is writable and both it and the machine's available memory have room for the files plus
    :data:`MEMORY_FS_MARGIN`; else inside ``beside``. Why: on a loaded ext4 disk, writing SmolLM2-135M's
    two fp32 graphs (1.1 GB) took 4-8 s of a 47 s export, against 0.3-0.6 s on
    tmpfs (benchmarks/README.md, export_time.py); files that are deleted a few
    seconds later never need the disk. They use RAM meanwhile (not the process's
    RSS): the margin keeps the rest of the export's memory free.
    """
    memory_fs = memory_fs or MEMORY_FS
    parent = Path(memory_fs) if memory_fs is not None and _has_room(Path(memory_fs), size_bytes) else Path(beside)
    if memory_fs is not None and parent == Path(memory_fs):
        remove_stale_staging(parent)  # left by killed exports (named as staging is: owner pid and host)
    directory = _staging_name(parent / "lora-edge-intermediate")
    directory.mkdir()
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path, option: str = "--out") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; it replaces ``target`` when the block succeeds.

    The file is created as an ordinary write would (the user's umask sets its mode).
    """
    target = Path(target)
    _prepare_parent(target, option)
    staging = _staging_name(target)
    os.close(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
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
    from importlib import metadata  # here: `lora-edge --help` imports this module, and metadata costs ~13 ms

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


def load_graph(path: Path, load_external_data: bool = True):
    """``onnx.load(path)``, or a BundleError naming the file when it is missing or not an ONNX model."""
    path = Path(path)
    if not path.is_file():
        raise BundleError("graph file is missing", path, "re-run lora-edge export (or quantize) for this graph")
    try:
        return _parse_mapped(path, load_external_data)
    except Exception as exc:  # protobuf's DecodeError, a truncated or missing external-data file, ...
        detail = (str(exc).splitlines() or [""])[0][:120]
        raise BundleError(f"not a readable ONNX graph ({exc.__class__.__name__}{': ' + detail if detail else ''})",
                          path, "re-run lora-edge export (or quantize) for this graph") from None


def _parse_mapped(path: Path, load_external_data: bool):
    """``onnx.load(path)``, parsed from the file's pages mapped into memory rather than read into a copy first.

    ``onnx.load`` reads the whole file into a bytes object and parses that: two
    copies of the weights made at once (91 MB + 91 MB for MiniLM-L6), where the
    mapped file's pages are the page cache's own. The parsed model owns its data.
    """
    import mmap

    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    with open(path, "rb") as handle:
        if path.stat().st_size == 0:  # nothing to map: onnx.load says what is wrong
            return onnx.load(str(path), load_external_data=load_external_data)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            model = onnx.ModelProto()
            with memoryview(mapped) as view:
                model.ParseFromString(view)
    if load_external_data:
        load_external_data_for_model(model, str(path.parent))
    return model


def parse_choices(enum_class: type[enum.Enum], values: list[str], option: str) -> list:
    """Turn option strings into enum members; an unknown one raises ConfigError listing the valid ones."""
    from lora_edge.core.errors import parse_enum

    if not values:
        valid = ", ".join(member.value for member in enum_class)
        raise ConfigError(f"no value given for {option}", option, f"use one or more of: {valid}")
    return [parse_enum(enum_class, value, option, what=option.lstrip("-").rstrip("s")) for value in values]
