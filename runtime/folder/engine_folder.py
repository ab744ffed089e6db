"""`EngineFolder`: one typed view of an engine folder, its specs parsed once.

The manifest is validated whole when the folder is opened (`read_manifest`); this object then
answers everything the runtime asks of the folder: each graph's spec (parsed from the manifest
once, not per call), the path of the file a backend loads for a graph, the host assets
(token embeddings, latent queries, the decoder's negative features), and the shapes the jobs
draw noise in (`feature_shape`, `latent_shape`: the one place the latent-size formula lives).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from runtime.errors import UserError
from runtime.folder.graphs import latent_side
from runtime.folder.manifest import (
    EngineFolderError,
    file_path,
    graph_spec,
    read_manifest,
    rebuild_hint,
    verify_folder,
)
from runtime.folder.spec import GraphSpec, numpy_dtype


def host_io_dtype(precision: str) -> np.dtype:
    """The numpy dtype of a folder's float feeds (bf16 needs `ml_dtypes`, as numpy has none)."""
    try:
        return numpy_dtype("float", precision)
    except ImportError as err:
        raise UserError(
            f"{precision} engine folders need ml_dtypes for their bfloat16 feeds: "
            "pip install ml_dtypes"
        ) from err


class EngineFolder:
    """A validated engine folder: `path`, `manifest`, `config`, `precision`, `io_dtype`,
    `sampler` (the defaults), `spec(name)`, `graph_file(name, backend)` and the host assets."""

    def __init__(self, path: str | Path, manifest: dict | None = None) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path) if manifest is None else manifest
        if "host" not in self.manifest:
            raise EngineFolderError(
                f"{self.path}: build did not finish; run {rebuild_hint(self.manifest)}"
            )
        self.config = self.manifest["config"]
        self.precision: str = self.manifest["precision"]
        self.variant: str = self.manifest["variant"]
        self.sampler: dict = self.manifest["sampler"]
        self._specs: dict[str, GraphSpec] = {}

    def __repr__(self) -> str:
        return f"EngineFolder({str(self.path)!r}, {self.variant}-{self.precision})"

    @cached_property
    def io_dtype(self) -> np.dtype:
        return host_io_dtype(self.precision)

    def verify(self, backend: str, mode: str = "fast") -> str:
        """Check the files `backend` loads (`runtime.folder.manifest.verify_folder`)."""
        return verify_folder(self.path, self.manifest, backend, mode)

    def rebuild_hint(self, **overrides) -> str:
        return rebuild_hint(self.manifest, **overrides)

    # graphs -------------------------------------------------------------------------------
    @property
    def graphs(self) -> list[str]:
        return list(self.manifest["graphs"])

    def spec(self, name: str) -> GraphSpec:
        """The graph's spec, parsed once (a missing graph is one line with the rebuild)."""
        if name not in self._specs:
            self._specs[name] = graph_spec(self.manifest, name)
        return self._specs[name]

    def graph_file(self, name: str, backend: str) -> Path:
        """The file a backend loads for a graph: its TensorRT engine or its ONNX."""
        self.spec(name)  # a missing graph says so first
        entry = self.manifest["graphs"][name]
        if backend == "tensorrt":
            if "engine" not in entry:
                raise EngineFolderError(
                    f"{self.path} has no TensorRT engine for {name}; build with: "
                    f"{self.rebuild_hint(backend='tensorrt')}"
                )
            return file_path(self.path, entry["engine"])
        return file_path(self.path, entry)

    def graph_entry(self, name: str) -> dict:
        """The manifest's record of a graph: its ONNX file, spec and, when built, its engine."""
        self.spec(name)
        return self.manifest["graphs"][name]

    # shapes -------------------------------------------------------------------------------
    def batch_range(self) -> tuple[int, int]:
        """(min, max) images per call of the generation graphs."""
        batch = self.spec("dit_step").dim("batch")
        return batch.min, batch.max

    def feature_shape(self, rows: int) -> tuple[int, int, int, int]:
        """The DiT's latent grid: (N, C, 8, 8) at every variant's `input_size`."""
        d = self.config["dit"]
        return (rows, d["in_channels"], d["input_size"], d["input_size"])

    def latent_shape(self, rows: int) -> tuple[int, int, int, int]:
        """The decoder's latents: (N, 4, l, l)."""
        dec = self.config["decoder"]
        side = latent_side(dec)
        return (rows, dec["latent_channels"], side, side)

    @property
    def image_size(self) -> int:
        return self.config["decoder"]["image_size"]

    def prefill_limit(self) -> int:
        """The most tokens one prefill takes."""
        return self.spec("prefill").dim("seq").max

    # host assets --------------------------------------------------------------------------
    def load_array(self, entry: dict, ndim: int, *, mmap: bool = False) -> np.ndarray:
        """A host asset (.npy) of the folder, refused with one line when it is not what it says."""
        path = file_path(self.path, entry)
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except Exception as err:  # numpy's header parser raises SyntaxError, TokenError, ...
            raise EngineFolderError(f"{path} is not a numpy array file ({err}); rebuild") from err
        if array.ndim != ndim or array.dtype.kind != "f":
            raise EngineFolderError(
                f"{path} holds a {array.dtype} array of shape {array.shape}; expected {ndim}-D "
                "floats; rebuild the folder"
            )
        return array

    @cached_property
    def embeddings(self) -> np.ndarray:
        return self.load_array(self.manifest["host"]["embeddings"], 2, mmap=True)  # (V, H)

    @cached_property
    def latent_queries(self) -> np.ndarray:
        return self.load_array(self.manifest["host"]["latent_queries"], 3)  # (1, 64, H)

    @cached_property
    def negative_features(self) -> np.ndarray:
        """(1, 64, C) decoder negative, built with the folder (`host.negative_features`): the
        DiT's features of the blank prompt, or zeros, as `sampler.decoder_negative` says."""
        entry = self.manifest["host"].get("negative_features")
        if entry is None:
            raise EngineFolderError(
                f"{self.path} has no decoder negative features; rebuild with: {self.rebuild_hint()}"
            )
        negative = self.load_array(entry, 3)
        d = self.config["dit"]
        shape = (1, d["input_size"] ** 2, d["in_channels"])
        if negative.shape != shape or not np.isfinite(negative).all():
            raise EngineFolderError(
                f"{file_path(self.path, entry)} holds {negative.shape} features (finite: "
                f"{bool(np.isfinite(negative).all())}); expected finite {shape}; rebuild "
                f"with: {self.rebuild_hint()}"
            )
        return negative.astype(np.float32)

    def check_assets(self, vocab: int) -> None:
        """The token embeddings cover the tokenizer and have the width the text graphs take; the
        latent queries have the shape the prefill and the DiT's condition take."""
        graphs = self.manifest["graphs"]  # a partial build may lack some graphs
        text = next((g for g in ("prefill", "decode") if g in graphs), None)
        width = self.spec(text).tensor("inputs_embeds").shape[-1] if text else None
        cond = self.spec("dit_step").tensor("cond").shape[1:] if "dit_step" in graphs else None
        width = width or (cond[-1] if cond else self.latent_queries.shape[-1])
        queries = (1, *cond) if cond else (1, self.latent_queries.shape[1], width)  # (1, 64, H)
        if self.embeddings.shape[1] != width or self.latent_queries.shape != queries:
            raise EngineFolderError(
                f"{self.path}: token embeddings {self.embeddings.shape} and latent queries "
                f"{self.latent_queries.shape} do not fit the graphs (width {width}, queries "
                f"{queries}); rebuild the folder"
            )
        if self.embeddings.shape[0] < vocab:
            raise EngineFolderError(
                f"{self.path}: {self.embeddings.shape[0]} token embeddings for a tokenizer of "
                f"{vocab} tokens; rebuild the folder"
            )
