"""`Generator`: BLIP3-o generation and understanding over an engine folder, without torch.

    with Generator.from_dir("engines/tiny-fp32") as gen:
        image = gen.generate("a red circle", seed=0)[0]
        print(gen.answer(image, "Describe the image."))

The Generator owns what jobs share: the engine folder (`EngineFolder`), the tokenizer, the
sessions (opened lazily, one per graph, by the chosen `Backend`; `low_memory=True` keeps only
the running stage's sessions open, for 8-16 GB Jetson boards) and a lock. Its loops live in the
jobs (`runtime.jobs`): `start` makes a `GenerationJob`, `start_answer` a `TokenJob`, and both
reach the Generator only through the small interface below (`lock`, `session`, `release`,
`open_job`, `close_job`, `embed`, `prompts`, `folder`).

Names, after onnxruntime-genai: its `Model` (owns the sessions) is our `Generator` and its
`Generator` (the caller-driven loop) our jobs; `GeneratorParams` is the same idea under the same
name. We keep `Generator` for the folder-level object because users, the README and the C++
header hold that name (`runtime.Generator.from_dir`), as diffusers users hold "pipeline".

Thread safety: one Generator serializes its session calls with `lock`, so it and its jobs may be
shared between threads, but calls do not run concurrently; use one Generator per thread (or
process) for parallel work.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from runtime.errors import UserError
from runtime.folder.engine_folder import EngineFolder
from runtime.folder.manifest import EngineFolderError
from runtime.folder.spec import GraphSpec
from runtime.host.text import PromptEncoder
from runtime.jobs.answer import TokenJob, stream_text
from runtime.jobs.generation import GenerationJob
from runtime.machine.compat import check_onnxruntime, environment_problems
from runtime.machine.probe import ort_facts
from runtime.params import AnswerParams, GeneratorParams
from runtime.sessions import Backend, Session, backends

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def check_backend(folder: EngineFolder, backend: str, device: str) -> None:
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
        check_onnxruntime(folder.precision, device, ort)


def default_device(backend: str) -> str:
    """The device a backend runs on unless told otherwise: TensorRT on the GPU, others on CPU."""
    return "cuda" if backend == "tensorrt" else "cpu"


class Generator:
    def __init__(
        self,
        folder: EngineFolder,
        *,
        backend: str = "onnxruntime",
        device: str | None = None,
        low_memory: bool = False,
        session_options: dict | None = None,
        open_graph: Callable[[GraphSpec], Session] | None = None,
    ) -> None:
        """Use `from_dir`, which checks the install and verifies the files first. Here: an
        opened `EngineFolder`. `open_graph(spec)` replaces the backend's sessions (the build
        runs this loop over the PyTorch model, benchmarks over timed sessions, Triton's
        orchestrator over BLS calls, tests over scripted ones)."""
        self.folder = folder
        self.backend = backend
        self.device = default_device(backend) if device is None else device
        self.low_memory = low_memory
        self.prompts = PromptEncoder.from_folder(folder.path, folder.manifest)
        folder.check_assets(self.prompts.tokenizer.get_vocab_size(with_added_tokens=True))
        self._open_graph = open_graph
        self._backend = (
            None if open_graph is not None else Backend(backend, self.device, session_options)
        )
        self._sessions: dict[str, Session] = {}
        self.lock = threading.RLock()  # one session call at a time; jobs take it per step
        self._jobs: weakref.WeakSet = weakref.WeakSet()  # open jobs (started, not finished)

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
        open after a build runs "full" (`runtime.folder.manifest.verify_folder`).

        `session_options` go to every session (e.g. `{"threads": 1}` for ONNX Runtime);
        `open_graph(spec)`, when given, opens every graph's session instead of the backend.
        """
        folder = EngineFolder(path)
        device = default_device(backend) if device is None else device
        if variant is not None and folder.variant != variant:
            raise EngineFolderError(
                f"{folder.path} holds a {folder.variant} engine folder, not {variant}; build "
                f"one with: python export/build_engines.py --variant {variant}"
            )
        if open_graph is None:
            check_backend(folder, backend, device)  # before hashing gigabytes
        folder.verify(backend, verify)
        return cls(
            folder,
            backend=backend,
            device=device,
            low_memory=low_memory,
            session_options=session_options,
            open_graph=open_graph,
        )

    # what the folder says, for callers that read it -----------------------------------------
    @property
    def manifest(self) -> dict:
        return self.folder.manifest

    @property
    def config(self) -> dict:
        return self.folder.config

    @property
    def precision(self) -> str:
        return self.folder.precision

    @property
    def io_dtype(self) -> np.dtype:
        return self.folder.io_dtype

    # the jobs' interface ----------------------------------------------------------------------
    def session(self, name: str) -> Session:
        """The graph's session, opened on first use."""
        if name not in self._sessions:
            if self._open_graph is not None:
                self._sessions[name] = self._open_graph(self.folder.spec(name))
            else:
                self._sessions[name] = self._backend.open(self.folder, name)
        return self._sessions[name]

    def release(self, name: str) -> None:
        """In low-memory mode, close a stage's session once the stage is over, unless another
        open job may still be in that stage (jobs hold their stage's session across steps)."""
        if self.low_memory and name in self._sessions and len(self._jobs) <= 1:
            self._sessions.pop(name).close()

    def open_job(self, job) -> None:
        """A job's first step: while it is open, its stages' sessions stay (low-memory mode)."""
        self._jobs.add(job)

    def close_job(self, job) -> None:
        """A job finished, failed or was cancelled: it holds no session open any more."""
        self._jobs.discard(job)
        if self.low_memory and not self._jobs:
            self.close()  # sessions kept open for overlapping jobs go once the last one ends

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.folder.embeddings[ids], dtype=np.float32)  # (S, H)

    def close(self) -> None:
        for s in self._sessions.values():
            s.close()
        self._sessions.clear()
        if self._backend is not None:  # after its sessions; a later session opens anew
            self._backend.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # public API -----------------------------------------------------------------------------
    def params(self, params: GeneratorParams | None = None, **settings) -> GeneratorParams:
        """`params` (or the defaults) with keyword `settings`, resolved against this folder:
        every unset value from the manifest's sampler, `num_images` within the batch size."""
        low, high = self.folder.batch_range()
        return GeneratorParams.of(params, **settings).resolved(self.folder.sampler, high, low)

    def start(
        self, prompt: str, params: GeneratorParams | None = None, **settings
    ) -> GenerationJob:
        """A stepwise generation: call `job.step()` until `job.done`, then `job.result()`.
        `params` and/or keyword settings (`seed=3, steps=20`: the fields of `GeneratorParams`).
        Words the folder's model was never trained on (`template.vocabulary`, tiny's shapes
        world) are named in a warning: what it draws for them is noise."""
        job = GenerationJob(self, prompt, self.params(params, **settings))
        if unknown := self.prompts.unknown_words(prompt):
            known = ", ".join(self.folder.manifest["template"]["vocabulary"])
            log.warning(
                "%s not in this model's vocabulary (it knows: %s)",
                ", ".join(map(repr, unknown)), known,
            )  # fmt: skip
        return job

    def generate(
        self,
        prompt: str,
        params: GeneratorParams | None = None,
        *,
        progress: Callable[[GenerationJob], None] | None = None,
        **settings,
    ):
        """Text to images: a list of `num_images` PIL images (unset values: the manifest's)."""
        with self.lock:
            job = self.start(prompt, params, **settings)
            while not job.done:
                job.step()
                if progress is not None:
                    progress(job)
            return job.result()

    def start_answer(
        self, image, question: str, params: AnswerParams | None = None, **settings
    ) -> TokenJob:
        """A caller-driven answer: `job.step()` until `job.done`, then `job.result()` (the
        text) and `job.finish_reason`. `params` and/or keyword settings (`max_new_tokens=64,
        temperature=0.7`: the fields of `AnswerParams`); greedy unless `temperature` > 0."""
        return TokenJob(self, image, question, AnswerParams.of(params, **settings))

    def answer(
        self,
        image,
        question: str,
        params: AnswerParams | None = None,
        *,
        stream: Callable[[str], None] | None = None,
        **settings,
    ) -> str:
        """Image understanding (greedy by default); `stream` receives text as it is decoded."""
        with self.lock:
            return stream_text(self.start_answer(image, question, params, **settings), stream)
