"""Content-keyed build stages of an engine folder.

Each stage (host assets, one graph's export, its quantization, its TensorRT engine) has a key: the
sha256 of a canonical JSON of everything its output depends on (checkpoint hash, precision,
spec, tool versions, our own exporter source, compute capability...). A stage whose key equals
the manifest's and whose recorded files still have their sha256 is skipped; otherwise it runs,
writing every file to a temporary name that is renamed only when complete, and the manifest is
rewritten (atomically) after each finished stage. A stage writes into a temporary folder inside
the engine folder (so ONNX external-data references keep their final names) whose files are
renamed into place only when the stage completes: an interrupted build leaves the finished stages
intact and no partial file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from runtime.folder.manifest import MANIFEST, UNVERIFIED, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
# Our own sources whose change must invalidate a stage's output, per stage kind: the model, its
# loading and what turns it into files, never the CLI, the build plan, the checks or the TensorRT
# code (an engine's key hashes its ONNX and build settings instead).
_MODEL_SOURCES = (
    *("training/model", "training/config.py", "training/checkpoint.py"),
    *("training/checkpoint_config.py", "training/checkpoint_files.py"),
    *("training/decoder_folder.py", "training/tokenizer.py", "training/random_weights.py"),
    *("export/source.py", "export/components.py", "export/precision.py"),
)
_SOURCE_DIRS = {
    "assets": (*_MODEL_SOURCES, "export/host_stages.py"),
    "export": (
        *_MODEL_SOURCES,
        "export/export_stages.py",
        "export/io_cast.py",
        "export/onnx_export.py",
        "export/wrappers",
        "runtime/folder/spec.py",
    ),  # fmt: skip
    "negative": (
        *(*_MODEL_SOURCES, "export/wrappers", "export/model_sessions.py"),
        *("export/host_stages.py", "export/build_folder.py", "export/torch_backend.py"),
        *("runtime/jobs/generation.py", "runtime/generator.py", "runtime/host/text.py"),
        "runtime/jobs/schedule.py",
    ),
    "quantize": (
        *_MODEL_SOURCES,
        *("export/quantize.py", "export/calibration.py", "export/onnx_export.py"),
        *("export/quantize_stages.py", "runtime/jobs/schedule.py", "training/flow.py"),
    ),
}
_TOOLS = ("torch", "transformers", "diffusers", "onnx", "onnxscript", "onnxruntime")


def canonical_hash(data) -> str:
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def tool_versions(names=_TOOLS + ("nvidia-modelopt", "tensorrt")) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    if "onnxruntime" in versions and versions["onnxruntime"] is None:
        # the `gpu` extra's onnxruntime-gpu installs the same `onnxruntime` module
        versions["onnxruntime"] = tool_versions(("onnxruntime-gpu",))["onnxruntime-gpu"]
    return versions


def exporter_source_hash(kind: str = "export") -> str:
    """Hash of our Python sources that make a stage's output (`kind`: assets|export|quantize)."""
    if kind not in _SOURCE_DIRS:
        raise ValueError(f"unknown stage kind {kind!r}; valid: {', '.join(_SOURCE_DIRS)}")
    files = []
    for entry in _SOURCE_DIRS[kind]:
        path = REPO / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return canonical_hash([(str(p.relative_to(REPO)), sha256_file(p)) for p in files])


def partial_dir(folder: Path, stage: str) -> Path:
    """The temporary folder a stage writes into before its files are renamed into place."""
    safe = stage.replace(":", "-").replace("/", "-")
    return folder / f".partial-{os.getpid()}-{safe}"


_OWNER = re.compile(r"^\.partial-(\d+)-|\.tmp-(\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_partials(folder: Path) -> list[Path]:
    """Delete leftovers of interrupted builds (temporary folders and names) whose writer is gone;
    a live process's temporary files (a runtime caching into the folder) are left alone."""
    removed = []
    for p in sorted(folder.glob(".partial-*")) + sorted(folder.glob("*.tmp-*")):
        match = _OWNER.search(p.name)
        pid = next((int(g) for g in match.groups() if g), None) if match else None
        if pid is not None and _alive(pid):
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def lock_path(folder: Path) -> Path:
    """The lock file of an engine folder: beside it, so it never lands in the folder's files."""
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's build lock for the block; a second build refuses with `LockedError`
    naming the process that holds it. The lock is an `flock` on `lock_path(folder)`, released
    by the kernel if the holder dies, so a killed build never leaves the folder locked."""
    import fcntl  # POSIX (Linux servers and Jetsons)

    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise LockedError(
                f"another build (pid {holder}) is writing {folder}; wait for it to finish, "
                "or build into another --out"
            ) from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class LockedError(RuntimeError):
    """The engine folder is being built by another process."""


class InterruptGuard:
    """Ctrl-C during a stage is never lost. While active (main thread only), SIGINT sets a flag
    and raises `KeyboardInterrupt`; code deep in an exporter that swallows the exception cannot
    hide it: `check()` after each stage raises it again, before the stage's files are kept."""

    def __init__(self) -> None:
        self.hit = False
        self._old = None

    def _handler(self, signum, frame) -> None:
        self.hit = True
        raise KeyboardInterrupt

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt("interrupted during a stage")


@dataclass
class Stage:
    """One unit of work: `run(tmp_dir)` writes its files (final names) into `tmp_dir`."""

    name: str
    key_data: dict
    run: Callable[[Path], dict | None]
    info: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return canonical_hash(self.key_data)


class BuildFolder:
    """An engine folder being built: the folder and its manifest, updated stage by stage (the
    runtime's view of a finished folder is `runtime.folder.engine_folder.EngineFolder`)."""

    def __init__(self, folder: Path, manifest: dict, guard: InterruptGuard | None = None) -> None:
        self.folder = folder
        self.manifest = manifest
        self.guard = guard or InterruptGuard()
        self.manifest.setdefault("stages", {})

    def up_to_date(self, stage: Stage) -> bool:
        record = self.manifest["stages"].get(stage.name)
        if not record or record.get("key") != stage.key:
            return False
        for entry in record["files"]:
            path = self.folder / entry["file"]
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                return False
            entry.setdefault("size", path.stat().st_size)  # records made before sizes were
        return True

    def run(self, stage: Stage) -> dict:
        """Run a stage unless up to date; return its manifest record."""
        if self.up_to_date(stage):
            log.info("%s: up to date", stage.name)
            return self.manifest["stages"][stage.name]
        tmp = partial_dir(self.folder, stage.name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            info = stage.run(tmp) or {}
            self.guard.check()  # a swallowed Ctrl-C must not keep a half-made stage
            written = sorted(p for p in tmp.iterdir() if p.is_file())
            if not written:
                raise RuntimeError(f"stage {stage.name} wrote no file")
            files = [
                {"file": p.name, "sha256": sha256_file(p), "size": p.stat().st_size}
                for p in written
            ]
            for p in written:
                os.replace(p, self.folder / p.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        record = {"key": stage.key, "files": files, **stage.info, **info}
        self.manifest["stages"][stage.name] = record
        (self.folder / UNVERIFIED).touch()  # the runtime's first open hashes what changed
        self.save()
        log.info("%s: done", stage.name)
        return record

    def save(self) -> None:
        atomic_write_json(self.folder / MANIFEST, self.manifest)


def host_entries(manifest: dict, *, negative: bool = True) -> dict:
    """The manifest's `host` section from its build stages' records: the `assets` stage's
    files, and the `negative` stage's (once it has run)."""
    stages = manifest["stages"]
    files = {f["file"]: f for f in stages["assets"]["files"]}
    host = {
        "embeddings": files["embeddings.npy"],
        "latent_queries": files["latent_queries.npy"],
        "tokenizer": files["tokenizer.json"],
    }
    if negative:
        (host["negative_features"],) = stages["negative"]["files"]
    return host
