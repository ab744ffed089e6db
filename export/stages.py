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

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runtime.manifest import MANIFEST, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
# Our own sources whose change must invalidate a stage's output, per stage kind: the model, its
# loading and what turns it into files, never the CLI, the plan, the checks or the TensorRT code
# (an engine's key hashes its ONNX and build settings instead).
_MODEL_SOURCES = (
    *("training/model", "training/config.py", "training/checkpoint.py"),
    *("training/checkpoint_config.py", "training/checkpoint_files.py"),
    *("training/decoder_folder.py", "training/tokenizer.py", "export/source.py"),
)
_SOURCE_DIRS = {
    "assets": (*_MODEL_SOURCES, "export/stage_defs.py"),
    "export": (*_MODEL_SOURCES, "export/onnx_export.py", "export/wrappers", "runtime/spec.py"),
    "quantize": (
        *_MODEL_SOURCES,
        *("export/quantize.py", "export/calibration.py", "export/onnx_export.py"),
        *("runtime/schedule.py", "training/flow.py"),
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


def remove_partials(folder: Path) -> list[Path]:
    """Delete leftovers of an interrupted build (temporary folders and names only)."""
    leftovers = sorted(folder.glob(".partial-*")) + sorted(folder.glob("*.tmp-*"))
    for p in leftovers:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return leftovers


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


class EngineFolder:
    """The output folder and its manifest, updated stage by stage."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder = folder
        self.manifest = manifest
        self.manifest.setdefault("stages", {})

    def up_to_date(self, stage: Stage) -> bool:
        record = self.manifest["stages"].get(stage.name)
        if not record or record.get("key") != stage.key:
            return False
        for entry in record["files"]:
            path = self.folder / entry["file"]
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                return False
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
            written = sorted(p for p in tmp.iterdir() if p.is_file())
            if not written:
                raise RuntimeError(f"stage {stage.name} wrote no file")
            files = [{"file": p.name, "sha256": sha256_file(p)} for p in written]
            for p in written:
                os.replace(p, self.folder / p.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        record = {"key": stage.key, "files": files, **stage.info, **info}
        self.manifest["stages"][stage.name] = record
        self.save()
        log.info("%s: done", stage.name)
        return record

    def save(self) -> None:
        atomic_write_json(self.folder / MANIFEST, self.manifest)
