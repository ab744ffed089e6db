"""CUDA memory, streams and the activation pool for the TensorRT sessions (cuda-python).

cuda-python returns every result as a tuple `(cudaError_t, *values)` and never raises: `check`
unwraps one, raising `CudaError` with the call's name and the error's name. Memory is owned by
objects with a lifetime (`DeviceBuffer`, freed when its last reference goes; `ActivationPool`;
`SharedDevice`, a Generator's device, stream and pool). The current CUDA device is a per-thread
setting: everything here that touches memory or a stream selects its device first (`select`),
so a session opened in one thread runs from another. cuda-python is the `trt` extra and is
imported only when a session opens (`cuda_runtime`).
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.sessions.trt_rules import pool_size

INSTALL = (
    "install the `trt` extra (pip install 'blip3o-edge[trt]': CUDA 12 builds, which CUDA 12 and "
    "13 drivers run; 'blip3o-edge[trt-cu13]' for CUDA 13 builds) on a machine with a GPU; on a "
    "Jetson, JetPack's TensorRT plus pip install 'cuda-python>=12,<13'"
)


class CudaError(RuntimeError):
    """A CUDA runtime call that returned an error (its name and the error's)."""


def cuda_runtime():
    """cuda-python's runtime module (`cuda.bindings.runtime`, or `cuda.cudart` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as err:
            raise RuntimeError(f"the tensorrt backend needs cuda-python: {INSTALL}") from err
    return runtime


def check(result, call: str = "CUDA call"):
    """Unwrap a cuda-python `(err, *values)` tuple; raise `CudaError` naming `call` and error."""
    if not isinstance(result, tuple) or not result:
        raise CudaError(f"{call}: expected an (error, ...) tuple from cuda-python, got {result!r}")
    err, values = result[0], result[1:]
    if int(getattr(err, "value", err)) != 0:
        name = getattr(err, "name", None) or f"error {int(getattr(err, 'value', err))}"
        raise CudaError(f"{call} failed: {name}")
    return values[0] if len(values) == 1 else (values or None)


def stream_handle(stream) -> int:
    """The integer handle TensorRT's `execute_async_v3` takes for a `cudaStream_t` (or an int)."""
    return stream if type(stream) is int else int(stream)


def device_index(device: str) -> int:
    """'cuda' -> 0, 'cuda:N' -> N; anything else is refused."""
    if not re.fullmatch(r"cuda(:\d+)?", str(device)):
        raise ValueError(f"TensorRT runs on device 'cuda' or 'cuda:N', got {device!r}")
    return int(device[5:] or 0)


def select(rt, index: int) -> None:
    """Make `index` this thread's current device (a per-thread CUDA setting) when it is not."""
    if check(rt.cudaGetDevice(), "cudaGetDevice") != index:
        check(rt.cudaSetDevice(index), f"cudaSetDevice({index})")


@dataclass(frozen=True)
class DeviceArray:
    """A tensor in device memory, ordered on `stream`. `owner` (a `DeviceBuffer`) keeps the
    memory alive as long as the array is referenced; None for memory the caller manages."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    stream: Any = None
    owner: Any = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class DeviceBuffer:
    """One cudaMalloc'd allocation, freed (cudaFree, which waits for pending work on it) when the
    last reference goes: outputs and caches own their memory, no session does."""

    def __init__(self, rt, nbytes: int, index: int = 0) -> None:
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(rt.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))
        self._finalizer = weakref.finalize(self, _free, rt, self.ptr, index)

    def free(self) -> None:
        self._finalizer()


def _free(rt, ptr: int, index: int) -> None:
    select(rt, index)
    check(rt.cudaFree(ptr), "cudaFree")


class ActivationPool:
    """One activation buffer for engines that run in sequence on one stream, never concurrently.
    Sessions record their engine's size in `sizes` when opened; the buffer is allocated on first
    `acquire` at `pool_size` of them all and grown if a larger engine joins later (sessions see
    the new address, rebind and recapture). Close it after the sessions that share it."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}  # session id -> its engine's device_memory_size
        self.ptr = self.nbytes = 0

    def acquire(self, rt) -> tuple[int, int]:
        need = pool_size(list(self.sizes.values()))
        if need > self.nbytes:
            self.close(rt)
            self.ptr, self.nbytes = int(check(rt.cudaMalloc(need), f"cudaMalloc({need})")), need
        return self.ptr, self.nbytes

    def close(self, rt=None) -> None:
        if self.ptr:
            rt = rt or cuda_runtime()
            check(rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
            check(rt.cudaFree(self.ptr), "cudaFree")
        self.ptr = self.nbytes = 0


class SharedDevice:
    """What one Generator's TensorRT sessions share: a CUDA device, one non-blocking stream and
    one activation pool. Close it after the sessions (`Generator.close`)."""

    def __init__(self, device: str = "cuda") -> None:
        self.index = device_index(device)
        rt = cuda_runtime()
        self.device, self._rt = device, rt
        check(rt.cudaSetDevice(self.index), f"cudaSetDevice({self.index})")
        flags = rt.cudaStreamNonBlocking
        self.stream = check(rt.cudaStreamCreateWithFlags(flags), "cudaStreamCreateWithFlags")
        self.pool = ActivationPool()

    def close(self) -> None:
        if self.stream is not None:
            select(self._rt, self.index)
            check(self._rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            self.pool.close(self._rt)
            check(self._rt.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.stream = None
