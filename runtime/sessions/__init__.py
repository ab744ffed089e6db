"""Sessions: one interface over ONNX Runtime, TensorRT and PyTorch.

A session has `spec` (its `GraphSpec`), `run(feeds) -> outputs` (dicts keyed by the spec's tensor
names) and `close()`. Feeds and outputs are the backend's own arrays: numpy for ONNX Runtime on
CPU, device buffers for GPU backends, so step loops keep their data on the device; `to_host`
turns any output into numpy. Backends are imported lazily by name: `import runtime` pulls in
none of them. Backends outside the runtime (the PyTorch reference in `export.torch_backend`)
plug in with `register_backend`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from runtime.spec import GraphSpec

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
