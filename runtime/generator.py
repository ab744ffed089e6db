"""`Generator`: BLIP3-o generation and understanding over an engine folder, without torch.

    with Generator.from_dir("engines/tiny-fp32") as gen:
        image = gen.generate("a red circle", seed=0)[0]
        print(gen.answer(image, "Describe the image."))

Sessions open lazily, one per graph, on the chosen backend; `low_memory=True` keeps only the
running stage's session open (for 8-16 GB Jetson boards). The decoder's negative features are a
file of the folder, made by the build (`sampler.decoder_negative`: the blank prompt's DiT
features, or zeros); the runtime never writes into the folder. Thread safety: one Generator
serializes its calls with a lock, so it may be shared between threads, but calls do not run
concurrently; use one Generator per thread (or process) for parallel work.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from runtime.compat import check_onnxruntime, environment_problems
from runtime.errors import UserError
from runtime.generation import GenerationJob
from runtime.manifest import (
    EngineFolderError,
    file_path,
    graph_spec,
    read_manifest,
    rebuild_hint,
    verify_folder,
)
from runtime.params import GeneratorParams
from runtime.probe import ort_facts
from runtime.sessions import Session, backends, open_session
from runtime.spec import GraphSpec, numpy_dtype
from runtime.text import PromptEncoder
from runtime.understanding import AnswerParams, TokenJob, stream_text

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def _check_backend(manifest: dict, backend: str, device: str) -> None:
    """Fail in one line before any session opens: an unknown backend, no (or the wrong) ONNX
    Runtime, a folder precision its device cannot run (the rules `runtime doctor` reports)."""
    if backend not in backends():
        hint = "; 'torch' needs `import export.torch_backend` first" if backend == "torch" else ""
        raise UserError(f"unknown backend {backend!r}; valid: {', '.join(backends())}{hint}")
    if backend == "onnxruntime":
        ort = ort_facts()
        for problem in environment_problems(ort) if ort.version else ():
            if problem not in _WARNED:  # two distributions: one of them wins, it may work
                _WARNED.add(problem)
                log.warning("%s", problem)
        check_onnxruntime(manifest["precision"], device, ort)


def default_device(backend: str) -> str:
    """The device a backend runs on unless told otherwise: TensorRT on the GPU, others on CPU."""
    return "cuda" if backend == "tensorrt" else "cpu"


def host_io_dtype(precision: str) -> np.dtype:
    """The numpy dtype of a folder's float feeds (bf16 needs `ml_dtypes`, as numpy has none)."""
    try:
        return numpy_dtype("float", precision)
    except ImportError as err:
        raise UserError(
            f"{precision} engine folders need ml_dtypes for their bfloat16 feeds: "
            "pip install ml_dtypes"
        ) from err


def _load_array(folder: Path, entry: dict, ndim: int, *, mmap: bool = False) -> np.ndarray:
    """A host asset (.npy) of the folder, refused with one line when it is not what it says."""
    path = file_path(folder, entry)
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise EngineFolderError(f"{path} is not a numpy array file ({err}); rebuild") from err
    if array.ndim != ndim or array.dtype.kind != "f":
        raise EngineFolderError(
            f"{path} holds a {array.dtype} array of shape {array.shape}; expected {ndim}-D "
            "floats; rebuild the folder"
        )
    return array


class Generator:
    def __init__(
        self,
        folder: Path,
        manifest: dict,
        *,
        backend: str,
        device: str,
        low_memory: bool,
        variant: str | None = None,
        session_options: dict | None = None,
        open_graph: Callable[[GraphSpec], Session] | None = None,
    ) -> None:
        """Use `from_dir`. `open_graph(spec)` replaces the backend's sessions (the build runs
        this loop over the PyTorch model, benchmarks over timed sessions, Triton's orchestrator
        over BLS calls); the backend's own install checks are then skipped."""
        if open_graph is None:
            _check_backend(manifest, backend, device)
        if variant is not None and manifest["variant"] != variant:
            raise EngineFolderError(
                f"{folder} holds a {manifest['variant']} engine folder, not {variant}; build "
                f"one with: python export/build_engines.py --variant {variant}"
            )
        self.folder, self.manifest = folder, manifest
        self.backend, self.device, self.low_memory = backend, device, low_memory
        self.config = manifest["config"]
        self.precision = manifest["precision"]
        self.io_dtype = host_io_dtype(self.precision)
        self.prompts = PromptEncoder.from_folder(folder, manifest)
        host = manifest["host"]
        self.embeddings = _load_array(folder, host["embeddings"], 2, mmap=True)  # (V, H)
        self.latent_queries = _load_array(folder, host["latent_queries"], 3)  # (1, 64, H)
        vocab = self.prompts.tokenizer.get_vocab_size(with_added_tokens=True)
        if self.embeddings.shape[0] < vocab:
            raise EngineFolderError(
                f"{folder}: {self.embeddings.shape[0]} token embeddings for a tokenizer of "
                f"{vocab} tokens; rebuild the folder"
            )
        if self.embeddings.shape[1] != self.latent_queries.shape[2]:
            raise EngineFolderError(
                f"{folder}: token embeddings {self.embeddings.shape} and latent queries "
                f"{self.latent_queries.shape} disagree on the width; rebuild the folder"
            )
        self.session_options = dict(session_options or {})
        self._open_graph = open_graph
        self._sessions: dict = {}
        self._device = None  # TensorRT: the stream and activation pool the sessions share
        self._negative: np.ndarray | None = None
        self._lock = threading.RLock()
        self._jobs: weakref.WeakSet[GenerationJob] = weakref.WeakSet()  # started, not finished

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        *,
        backend: str = "onnxruntime",
        device: str | None = None,
        low_memory: bool = False,
        variant: str | None = None,
        verify: str = "fast",
        session_options: dict | None = None,
        open_graph: Callable[[GraphSpec], Session] | None = None,
    ) -> Generator:
        """Open an engine folder. The manifest is validated whole in any case
        (`read_manifest`), file names confined to the folder; then `verify` checks the files
        this backend will load (the ONNX graphs, or the TensorRT engines, and the host assets):
        "fast" (default) their sizes, "full" their sha256 too, "none" nothing. The first "fast"
        open after a build runs "full" (`runtime.manifest.verify_folder`).

        `session_options` go to every session (e.g. `{"threads": 1}` for ONNX Runtime);
        `open_graph(spec)`, when given, opens every graph's session instead of the backend.
        """
        folder = Path(path)
        device = default_device(backend) if device is None else device
        manifest = read_manifest(folder)
        if open_graph is None:
            _check_backend(manifest, backend, device)  # before hashing gigabytes
        if "host" not in manifest:
            raise EngineFolderError(f"{folder}: build did not finish; run {rebuild_hint(manifest)}")
        verify_folder(folder, manifest, backend, verify)
        return cls(
            folder,
            manifest,
            backend=backend,
            device=device,
            low_memory=low_memory,
            variant=variant,
            session_options=session_options,
            open_graph=open_graph,
        )

    # sessions -------------------------------------------------------------------------------
    def session(self, name: str):
        if name not in self._sessions and self._open_graph is not None:
            self._sessions[name] = self._open_graph(graph_spec(self.manifest, name))
        if name not in self._sessions:
            spec = graph_spec(self.manifest, name)
            entry = self.manifest["graphs"][name]
            if self.backend == "tensorrt":
                if "engine" not in entry:
                    raise EngineFolderError(
                        f"{self.folder} has no TensorRT engine for {name}; build with: "
                        f"{rebuild_hint(self.manifest, backend='tensorrt')}"
                    )
                path = file_path(self.folder, entry["engine"])
            elif self.backend == "torch":
                path = self.folder
            else:
                path = file_path(self.folder, entry)
            options = dict(self.session_options)
            if self.backend == "tensorrt":  # one stream and activation pool for all sessions
                options.setdefault("shared", self._shared_device())
            self._sessions[name] = open_session(
                spec, path, self.backend, device=self.device, precision=self.precision, **options
            )
        return self._sessions[name]

    def release(self, name: str) -> None:
        """In low-memory mode, close a stage's session once the stage is over, unless another
        open job may still be in that stage (jobs hold their stage's session across steps)."""
        if self.low_memory and name in self._sessions and len(self._jobs) <= 1:
            self._sessions.pop(name).close()

    def _job_finished(self, job: GenerationJob) -> None:
        self._jobs.discard(job)
        if self.low_memory and not self._jobs:
            self.close()  # sessions kept open for overlapping jobs go once the last one ends

    def _shared_device(self):
        if self._device is None:
            from runtime.sessions.tensorrt import SharedDevice

            self._device = SharedDevice(self.device)
        return self._device

    def close(self) -> None:
        for s in self._sessions.values():
            s.close()
        self._sessions.clear()
        if self._device is not None:  # after its sessions; a later session opens a new one
            self._device.close()
            self._device = None

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # host pieces ----------------------------------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.embeddings[ids], dtype=np.float32)  # (S, H)

    def conditioning(self, prompt: str, *, template: bool = True) -> np.ndarray:
        """(1, 64, H) DiT conditioning: prefill over the prompt embeddings + latent queries."""
        ids = self.prompts.generation_ids(prompt, template=template)
        spec = graph_spec(self.manifest, "prefill")
        limit = spec.dim("seq").max - self.latent_queries.shape[1]
        if len(ids) > limit:
            raise UserError(
                f"prompt is {len(ids)} tokens; this engine folder's prefill takes at most "
                f"{limit} (+ {self.latent_queries.shape[1]} queries). Shorten the prompt."
            )
        embeds = np.concatenate([self.embed(ids)[None], self.latent_queries.astype(np.float32)], 1)
        s = embeds.shape[1]
        positions = np.broadcast_to(np.arange(s, dtype=np.int64), (3, 1, s)).copy()
        prefill = self.session("prefill")
        out = prefill.run(
            {"inputs_embeds": embeds.astype(self.io_dtype), "position_ids": positions}
        )
        hidden = prefill.to_host(out["hidden_states"]).astype(np.float32)
        self.release("prefill")
        return hidden[:, -self.latent_queries.shape[1] :]  # (1, 64, H)

    def negative_features(self) -> np.ndarray:
        """(1, 64, C) decoder negative, built with the folder (`host.negative_features`): the
        DiT's features of the blank prompt, or zeros, as `sampler.decoder_negative` says."""
        if self._negative is None:
            entry = self.manifest.get("host", {}).get("negative_features")
            if entry is None:
                raise EngineFolderError(
                    f"{self.folder} has no decoder negative features; rebuild with: "
                    f"{rebuild_hint(self.manifest)}"
                )
            negative = _load_array(self.folder, entry, 3)
            d = self.config["dit"]
            shape = (1, d["input_size"] ** 2, d["in_channels"])
            if negative.shape != shape or not np.isfinite(negative).all():
                raise EngineFolderError(
                    f"{file_path(self.folder, entry)} holds {negative.shape} features (finite: "
                    f"{bool(np.isfinite(negative).all())}); expected finite {shape}; rebuild "
                    f"with: {rebuild_hint(self.manifest)}"
                )
            self._negative = negative.astype(np.float32)
        return self._negative

    # public API -----------------------------------------------------------------------------
    def params(self, params: GeneratorParams | None = None, **settings) -> GeneratorParams:
        """`params` (or the defaults) with keyword `settings`, resolved against this folder:
        every unset value from the manifest's sampler, `num_images` within the batch size."""
        batch = graph_spec(self.manifest, "dit_step").dim("batch")
        return GeneratorParams.of(params, **settings).resolved(
            self.manifest["sampler"], batch.max, batch.min
        )

    def start(
        self, prompt: str, params: GeneratorParams | None = None, **settings
    ) -> GenerationJob:
        """A stepwise generation: call `job.step()` until `job.done`, then `job.result()`.
        `params` and/or keyword settings (`seed=3, steps=20`: the fields of `GeneratorParams`)."""
        return GenerationJob(self, prompt, self.params(params, **settings))

    def generate(
        self,
        prompt: str,
        params: GeneratorParams | None = None,
        *,
        progress: Callable[[GenerationJob], None] | None = None,
        **settings,
    ):
        """Text to images: a list of `num_images` PIL images (unset values: the manifest's)."""
        with self._lock:
            job = self.start(prompt, params, **settings)
            while not job.done:
                job.step()
                if progress is not None:
                    progress(job)
            return job.result()

    def start_answer(
        self,
        image,
        question: str,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> TokenJob:
        """A caller-driven answer: `job.generate_next_token()` until `job.done`, then
        `job.text()` and `job.finish_reason`. Greedy unless `temperature` > 0."""
        with self._lock:
            params = AnswerParams(max_new_tokens, temperature, top_p, seed)
            return TokenJob(self, image, question, params)

    def answer(
        self,
        image,
        question: str,
        *,
        max_new_tokens: int = 32,
        stream: Callable[[str], None] | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> str:
        """Image understanding (greedy by default); `stream` receives text as it is decoded."""
        with self._lock:
            job = self.start_answer(
                image,
                question,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
            )
            return stream_text(job, stream)
