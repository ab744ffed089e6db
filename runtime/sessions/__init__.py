"""Sessions: one interface over ONNX Runtime, TensorRT and PyTorch.

A session has `spec` (its `GraphSpec`), `run(feeds) -> outputs` (dicts keyed by the spec's tensor
names) and `close()`. Feeds and outputs are the backend's own arrays: numpy for ONNX Runtime on
CPU, device buffers for GPU backends, so step loops keep their data on the device; `to_host`
turns any output into numpy. Backends are imported lazily by name: `import runtime` pulls in
none of them. Backends outside the runtime (the PyTorch reference in `export.torch_backend`)
plug in with `register_backend`.

`Backend` is a backend bound to a device for one Generator: it opens a folder's graphs (the file
each backend loads is its business, not the Generator's) and owns what its sessions share
(TensorRT: one stream and one activation pool).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from runtime.folder.spec import GraphSpec

BACKENDS = ("onnxruntime", "tensorrt")  # built in; more register themselves (`register_backend`)
_REGISTRY: dict[str, Callable[..., Session]] = {}


def register_backend(name: str, factory: Callable[..., Session]) -> None:
    """Add a session backend: `factory(spec, path, device=, precision=, **options)`. The PyTorch
    reference (`export.torch_backend`, outside the runtime) registers "torch" when imported."""
    _REGISTRY[name] = factory


def backends() -> tuple[str, ...]:
    return BACKENDS + tuple(n for n in _REGISTRY if n not in BACKENDS)


class Session(Protocol):
    spec: GraphSpec

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]: ...

    def to_host(self, value: Any): ...

    def close(self) -> None: ...


def open_session(
    spec: GraphSpec,
    path: str | Path,
    backend: str = "onnxruntime",
    *,
    device: str = "cpu",
    precision: str = "fp32",
    **options,
) -> Session:
    """Open the graph at `path` (ONNX file, TensorRT engine, or engine folder for torch)."""
    if backend == "onnxruntime":
        from runtime.sessions.onnxruntime import OrtSession

        return OrtSession(spec, path, device=device, precision=precision, **options)
    if backend == "tensorrt":
        from runtime.sessions.tensorrt import TrtSession

        return TrtSession(spec, path, device=device, precision=precision, **options)
    if backend in _REGISTRY:
        return _REGISTRY[backend](spec, path, device=device, precision=precision, **options)
    hint = "; 'torch' needs `import export.torch_backend` first" if backend == "torch" else ""
    raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(backends())}{hint}")


class Backend:
    """`name` on `device` for one Generator: `open(folder, graph)` a session, `close()` what
    the sessions shared (after them). `options` go to every session (e.g. `threads=1`)."""

    def __init__(self, name: str, device: str, options: dict | None = None) -> None:
        if name not in backends():
            hint = "; 'torch' needs `import export.torch_backend` first" if name == "torch" else ""
            raise ValueError(f"unknown backend {name!r}; valid: {', '.join(backends())}{hint}")
        self.name, self.device, self.options = name, device, dict(options or {})
        self.shared = None  # TensorRT: the stream and activation pool of this backend's sessions

    def open(self, folder, graph: str) -> Session:
        """A session over `graph` of an `EngineFolder`: its ONNX (onnxruntime), its engine
        (tensorrt, checked against the manifest's record of it), or the folder (registered
        backends such as torch load what they need from it)."""
        options = dict(self.options)
        if self.name == "tensorrt":
            from runtime.sessions.tensorrt import SharedDevice

            if self.shared is None:
                self.shared = SharedDevice(self.device)
            options.setdefault("shared", self.shared)
            options.setdefault("record", (folder.graph_entry(graph), folder.manifest))
        path = folder.path if self.name in _REGISTRY else folder.graph_file(graph, self.name)
        return open_session(
            folder.spec(graph), path, self.name, device=self.device,
            precision=folder.precision, **options,
        )  # fmt: skip

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()
            self.shared = None
