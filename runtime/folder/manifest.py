"""The engine folder's `manifest.json`: the only link between the exporter and the runtime.

It records the variant, the precision, each graph's file, sha256 and spec, the host assets
(tokenizer, token embeddings, latent queries), the prompt template, the sampler defaults, the
checkpoint hash, tool versions and the compute capability the engines were built for, plus the
exporter's per-stage cache keys. Files are written to a temporary name and renamed, so a reader
never sees a half-written manifest or artifact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
from pathlib import Path

from runtime.errors import UserError
from runtime.folder.schema import FORMAT_VERSION, SCHEMAS, SchemaError, confined, validate
from runtime.folder.spec import GraphSpec, spec_from_dict

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
# Written by a build that changed a file; the first full verify of the folder removes it.
UNVERIFIED = ".unverified"
VERIFY_MODES = ("none", "fast", "full")
MAX_MANIFEST_BYTES = 64 << 20  # 4b's is ~100 kB


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class EngineFolderError(UserError):
    """An engine folder that is missing, corrupt or built for something else."""


def rebuild_hint(
    manifest: dict | None,
    *,
    precision: str | None = None,
    backend: str | None = None,
    out: str | Path | None = None,
) -> str:
    """The build command that remakes this folder (`precision`/`backend` override the
    manifest's; `out` rebuilds in place). 4b/8b name the checkpoint they were built from (the
    tiny one defaults to the shipped checkpoint); random-weight folders say so."""
    if not manifest:
        return "python export/build_engines.py --variant tiny"
    variant = manifest.get("variant", "tiny")
    cmd = f"python export/build_engines.py --variant {variant}"
    checkpoint = manifest.get("checkpoint")
    checkpoint = checkpoint if isinstance(checkpoint, dict) else {}  # read before validation
    seed = str(checkpoint.get("hash") or "").removeprefix("random-weights-seed-")
    if seed.isdigit():
        cmd += " --random-weights" + (f" --seed {seed}" if seed != "0" else "")
    elif variant != "tiny" and checkpoint.get("path"):
        cmd += f" --checkpoint {shlex.quote(str(checkpoint['path']))}"
    if precision or manifest.get("precision"):
        cmd += f" --precision {precision or manifest['precision']}"
    backend = backend or manifest.get("backend")
    if backend and backend != "onnxruntime":
        cmd += f" --backend {backend}"
    if out is not None:
        cmd += f" --out {shlex.quote(str(out))}"
    return cmd + " --force"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to `path.tmp-<pid>` then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def load_manifest(folder: str | Path) -> dict:
    """Read an engine folder's manifest and check its format (the exporter's view, which also
    reads folders whose build has not finished). The runtime opens folders with `read_manifest`."""
    folder = Path(folder)
    if not folder.exists():
        raise EngineFolderError(
            f"engine folder {folder} does not exist; build one with: {rebuild_hint(None)}"
        )
    if not folder.is_dir():
        raise EngineFolderError(
            f"{folder} is a file, not an engine folder; pass the folder that holds {MANIFEST}"
        )
    path = folder / MANIFEST
    if not path.is_file():
        raise EngineFolderError(
            f"{folder} has no {MANIFEST}: not an engine folder; build one with: "
            f"{rebuild_hint(None)}"
        )
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"over {MAX_MANIFEST_BYTES >> 20} MiB")
        manifest = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (OSError, ValueError, RecursionError) as err:  # ValueError: JSON, UTF-8, int digits
        reason = " ".join(str(err).split())[:200]
        raise EngineFolderError(
            f"{path} is not valid JSON ({type(err).__name__}: {reason}); rebuild the folder"
        ) from err
    if not isinstance(manifest, dict):
        raise EngineFolderError(f"{path} is not a JSON object; rebuild the folder")
    hint = rebuild_hint(manifest if isinstance(manifest.get("variant"), str) else None)
    version = manifest.get("format")
    if type(version) is int and version > FORMAT_VERSION:
        needs = manifest.get("min_runtime")
        needs = f"blip3o-edge {needs} or newer" if isinstance(needs, str) else "a newer blip3o-edge"
        raise EngineFolderError(
            f"{path}: manifest format {version} is newer than this runtime reads (format "
            f"{FORMAT_VERSION}); it needs {needs}: upgrade, or rebuild with this version: {hint}"
        )
    if type(version) is not int or version not in SCHEMAS:
        raise EngineFolderError(
            f"{path}: manifest format {version!r}, this runtime reads format {FORMAT_VERSION}; "
            f"rebuild with: {hint}"
        )
    for key in ("variant", "precision", "graphs", "config"):
        if key not in manifest:
            raise EngineFolderError(f"{path}: field {key!r} is missing; rebuild with: {hint}")
    return manifest


def read_manifest(folder: str | Path) -> dict:
    """`load_manifest` plus the whole schema: every field the runtime reads has the right type
    and range, and every file name stays inside the folder."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    try:
        validate(manifest, folder)
    except SchemaError as err:
        hint = rebuild_hint(manifest if isinstance(manifest.get("variant"), str) else None)
        raise EngineFolderError(f"{folder / MANIFEST}: {err}; rebuild with: {hint}") from err
    return manifest


def verify_file(folder: Path, entry: dict, manifest: dict, *, full: bool = True) -> Path:
    """Check one recorded file's presence and size, and with `full` its sha256; return its
    path (external data files of a graph are checked with it)."""
    path = file_path(folder, entry)
    if not path.is_file():
        raise EngineFolderError(
            f"{path} is listed in the manifest but missing; rebuild with: {rebuild_hint(manifest)}"
        )
    size = path.stat().st_size
    if size != entry["size"]:
        raise EngineFolderError(
            f"{path} is {size} bytes, the manifest says {entry['size']} (truncated or replaced); "
            f"rebuild with: {rebuild_hint(manifest)}"
        )
    if full and sha256_file(path) != entry["sha256"]:
        raise EngineFolderError(
            f"{path} does not match the sha256 in the manifest (corrupt or replaced); "
            f"rebuild with: {rebuild_hint(manifest)}"
        )
    for extra in entry.get("external_data", []):
        verify_file(folder, extra, manifest, full=full)
    return path


def loaded_files(manifest: dict, backend: str):
    """The file records a backend opens: the host assets, then each graph's ONNX (with its
    external data) or, for TensorRT, its engine."""
    yield from manifest["host"].values()
    for graph in manifest["graphs"].values():
        if backend == "tensorrt":
            if graph.get("engine"):
                yield graph["engine"]
        else:
            yield graph


def verify_folder(folder: Path, manifest: dict, backend: str, mode: str = "fast") -> str:
    """Check the files `backend` will load; return the mode that ran.

    `fast`: each file exists with its recorded size (the manifest itself was validated whole by
    `read_manifest`). `full`: and its sha256 (reads every byte: tens of GB at 4b). `none`: no
    file check. A folder a build has just changed (`UNVERIFIED` marker) gets `full` on its first
    `fast` open, which then removes the marker; a read-only folder keeps it (and is hashed at
    each open), with a warning. A bool is accepted as before modes existed: True is "full",
    False "none".
    """
    if isinstance(mode, bool):
        mode = "full" if mode else "none"
    if mode not in VERIFY_MODES:
        raise UserError(f"unknown verify mode {mode!r}; valid: {', '.join(VERIFY_MODES)}")
    marker = folder / UNVERIFIED
    if mode == "fast" and marker.exists():
        mode = "full"
    if mode == "none":
        return mode
    for entry in loaded_files(manifest, backend):
        verify_file(folder, entry, manifest, full=mode == "full")
    if mode == "full" and marker.exists():
        try:
            marker.unlink()
        except OSError as err:
            log.warning(
                "%s: cannot remove %s (%s); it is hashed at every open", folder, marker, err
            )
    return mode


def file_path(folder: Path, entry: dict) -> Path:
    """The path of a manifest file record, refused when it leads outside the folder."""
    try:
        return confined(folder, entry["file"], "file")
    except SchemaError as err:
        raise EngineFolderError(f"{folder / MANIFEST}: {err}") from err


def graph_spec(manifest: dict, name: str) -> GraphSpec:
    graphs = manifest["graphs"]
    if name not in graphs:
        raise EngineFolderError(
            f"graph {name!r} is not in this engine folder (it has {sorted(graphs)}); "
            f"rebuild with: {rebuild_hint(manifest)}"
        )
    return spec_from_dict(graphs[name]["spec"])
