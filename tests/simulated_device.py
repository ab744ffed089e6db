"""A simulated CUDA device and TensorRT, in numpy, for testing the TensorRT session on CPU.

`install(monkeypatch)` puts fake `tensorrt`, `cuda`, `cuda.bindings` and `cuda.bindings.runtime`
modules into `sys.modules`, so the session's own imports pick them up and its control flow runs
unchanged. The fakes follow the real APIs where our code meets them (checked against the real
bindings by `tests/test_trt_conformance.py`) and keep the rules a GPU enforces, loudly:

- CUDA calls return `(cudaError_t, *values)` tuples and never raise: a double free, a destroyed
  stream, a stream of another device than the thread's current one, are
  error codes the caller must check; a fault inside queued work (use after free, access past an
  allocation) is recorded in `Device.faults` and makes every later call return
  `cudaErrorIllegalAddress` (sticky, as on a GPU);
- work is queued per stream and runs only when something waits for it (`cudaStreamSynchronize`,
  `cudaDeviceSynchronize`, `cudaFree`): a device-to-host copy read before a sync gives garbage,
  so a missing sync shows; host-to-device copies read their source when enqueued (staging);
- the current device is per thread (two devices exist), as in CUDA: an engine enqueued from a
  thread whose current device is not its own fails;
- streams are `cudaStream_t` objects, not ints; memory is numbered 256-byte aligned allocations,
  never reused.
The TensorRT half (`tests/simulated_tensorrt.py`) checks addresses (256-byte alignment), shapes,
the stream handle's type, and computes for real: a plan file made by `write_plan` holds the
graph's ONNX, run by ONNX Runtime, so results can be compared with the onnxruntime backend.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import json
import sys
import threading
import types
from pathlib import Path

import numpy as np

TRT_VERSION, SM = "10.8.0", (9, 0)
DEVICES = 2


class SimulatedDeviceError(RuntimeError):
    """A fault inside queued work (recorded in `Device.faults`), or misuse of the test helpers."""


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's names and values
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900


OK = cudaError_t.cudaSuccess


class cudaStream_t:  # noqa: N801 - an object, as in cuda-python: int() gives the handle
    def __init__(self, handle: int = 0) -> None:
        self._handle = int(handle)

    def __int__(self) -> int:
        return self._handle

    def getPtr(self) -> int:  # noqa: N802
        return id(self)

    def __repr__(self) -> str:
        return f"<cudaStream_t {self._handle:#x}>"


class cudaGraph_t:  # noqa: N801
    def __init__(self, work=None) -> None:
        self.work = list(work or [])


class cudaGraphExec_t:  # noqa: N801
    def __init__(self, work=None) -> None:
        self.work = list(work or [])


class Device:
    """The memory, streams and graphs of the simulated GPUs; counters for the tests."""

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}  # base address -> bytes
        self.owner: dict[int, int] = {}  # base address -> device index
        self.freed: dict[int, int] = {}  # base address -> size of freed allocations
        self.next = 0x10000
        self.streams: dict[int, int] = {}  # handle -> device index
        self.queues: dict[int, list] = {}  # handle -> pending work, in order
        self.next_stream = 0x7000
        self.capturing: dict[int, list] = {}  # stream -> recorded launches
        self.faults: list[str] = []
        self.launches = self.replays = self.executions = 0
        self._thread = threading.local()

    # the per-thread current device -------------------------------------------------------
    @property
    def current(self) -> int:
        return getattr(self._thread, "device", 0)

    @current.setter
    def current(self, index: int) -> None:
        self._thread.device = index

    # memory ------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        ptr, self.next = self.next, self.next + ((nbytes + 255) // 256 + 1) * 256
        self.memory[ptr] = np.full(nbytes, 0xAB, np.uint8)  # garbage, like fresh cudaMalloc
        self.owner[ptr] = self.current
        return ptr

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        """The bytes [ptr, ptr + nbytes) of one live allocation, or a loud error."""
        for base, block in self.memory.items():
            if base <= ptr < base + len(block):
                if ptr + nbytes > base + len(block):
                    raise SimulatedDeviceError(
                        f"access of {nbytes} bytes at {ptr:#x} runs past its allocation "
                        f"({base:#x}, {len(block)} bytes)"
                    )
                return block[ptr - base : ptr - base + nbytes]
        if any(base <= ptr < base + size for base, size in self.freed.items()):
            raise SimulatedDeviceError(f"use after free: {ptr:#x} lies in a freed allocation")
        raise SimulatedDeviceError(f"access to {ptr:#x}, which is no live allocation")

    def live(self) -> int:
        return len(self.memory)

    # streams and queued work -------------------------------------------------------------
    def enqueue(self, stream, work) -> None:
        """Queue `work` on its stream, or record it when the stream is capturing."""
        handle = int(stream)
        if handle in self.capturing:
            self.capturing[handle].append(work)
        else:
            self.queues[handle].append(work)

    def drain(self, handle: int | None = None) -> None:
        """Run the pending work of one stream (or all); a fault is recorded, and sticks."""
        for h in [handle] if handle is not None else list(self.queues):
            queue = self.queues.get(h, [])
            while queue and not self.faults:
                work = queue.pop(0)
                try:
                    work()
                except SimulatedDeviceError as err:
                    self.faults.append(str(err))
            queue.clear()


DEVICE: Device | None = None


# ---- cuda.bindings.runtime ----------------------------------------------------------------------
def _cuda_module(device: Device) -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
        cudaMemcpyHostToHost = 0
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3
        cudaMemcpyDefault = 4

    class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
        cudaStreamCaptureModeGlobal = 0
        cudaStreamCaptureModeThreadLocal = 1
        cudaStreamCaptureModeRelaxed = 2

    class cudaDeviceProp:  # noqa: N801
        def __init__(self) -> None:
            self.major, self.minor, self.name = SM[0], SM[1], b"Simulated GPU"

    def api(fn):
        """A CUDA call: sticky faults first, then the call's own checks."""

        def call(*args):
            if device.faults:
                return (cudaError_t.cudaErrorIllegalAddress,) + (None,) * (fn.values)
            return fn(*args)

        call.__name__ = fn.__name__
        return call

    def values(n):
        def mark(fn):
            fn.values = n
            return fn

        return mark

    def stream_ok(stream) -> cudaError_t:
        if not isinstance(stream, cudaStream_t) and type(stream) is not int:
            return cudaError_t.cudaErrorInvalidValue
        handle = int(stream)
        if handle not in device.streams:
            return cudaError_t.cudaErrorInvalidResourceHandle
        if device.streams[handle] != device.current:
            return cudaError_t.cudaErrorInvalidResourceHandle
        return OK

    @values(0)
    def cudaSetDevice(index):  # noqa: N802
        if not 0 <= int(index) < DEVICES:
            return (cudaError_t.cudaErrorInvalidDevice,)
        device.current = int(index)
        return (OK,)

    @values(1)
    def cudaGetDevice():  # noqa: N802
        return OK, device.current

    @values(1)
    def cudaGetDeviceCount():  # noqa: N802
        return OK, DEVICES

    @values(1)
    def cudaGetDeviceProperties(index):  # noqa: N802
        if not 0 <= int(index) < DEVICES:
            return cudaError_t.cudaErrorInvalidDevice, None
        return OK, cudaDeviceProp()

    @values(1)
    def cudaMalloc(nbytes):  # noqa: N802
        if int(nbytes) <= 0:
            return cudaError_t.cudaErrorInvalidValue, None
        return OK, device.malloc(int(nbytes))

    @values(0)
    def cudaFree(ptr):  # noqa: N802
        device.drain()  # cudaFree waits for the device's pending work
        if device.faults:
            return (cudaError_t.cudaErrorIllegalAddress,)
        ptr = int(ptr)
        if ptr not in device.memory:
            return (cudaError_t.cudaErrorInvalidValue,)  # already freed, or never allocated
        device.freed[ptr] = len(device.memory.pop(ptr))
        device.owner.pop(ptr)
        return (OK,)

    def _host(ptr: int, nbytes: int) -> np.ndarray:
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))

    def _copy(dst, src, nbytes, kind):
        """The work of one copy; a host source is read now (staged), the rest when it runs."""
        kinds = cudaMemcpyKind
        host_src = kind in (kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyHostToHost)
        to_host = kind in (kinds.cudaMemcpyDeviceToHost, kinds.cudaMemcpyHostToHost)
        staged = _host(src, nbytes).copy() if host_src else None

        def work():
            data = staged if host_src else device.view(src, nbytes)
            (_host(dst, nbytes) if to_host else device.view(dst, nbytes))[:] = data

        return work

    @values(0)
    def cudaMemcpyAsync(dst, src, nbytes, kind, stream):  # noqa: N802
        if (err := stream_ok(stream)) != OK:
            return (err,)
        if not isinstance(kind, cudaMemcpyKind):
            return (cudaError_t.cudaErrorInvalidValue,)
        device.enqueue(stream, _copy(int(dst), int(src), int(nbytes), kind))
        return (OK,)

    @values(0)
    def cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream):  # noqa: N802
        if (err := stream_ok(stream)) != OK:
            return (err,)
        if int(width) > int(dpitch) or int(width) > int(spitch):
            return (cudaError_t.cudaErrorInvalidValue,)
        rows = [
            _copy(int(dst) + r * int(dpitch), int(src) + r * int(spitch), int(width), kind)
            for r in range(int(height))
        ]
        device.enqueue(stream, lambda: [row() for row in rows])
        return (OK,)

    @values(1)
    def cudaStreamCreateWithFlags(flags):  # noqa: N802
        handle, device.next_stream = device.next_stream, device.next_stream + 0x100
        device.streams[handle], device.queues[handle] = device.current, []
        return OK, cudaStream_t(handle)

    @values(0)
    def cudaStreamSynchronize(stream):  # noqa: N802
        if (err := stream_ok(stream)) != OK:
            return (err,)
        device.drain(int(stream))
        return (cudaError_t.cudaErrorIllegalAddress if device.faults else OK,)

    @values(0)
    def cudaDeviceSynchronize():  # noqa: N802
        device.drain()
        return (cudaError_t.cudaErrorIllegalAddress if device.faults else OK,)

    @values(0)
    def cudaStreamDestroy(stream):  # noqa: N802
        if (err := stream_ok(stream)) != OK:
            return (err,)
        device.drain(int(stream))
        del device.streams[int(stream)], device.queues[int(stream)]
        return (OK,)

    @values(0)
    def cudaStreamBeginCapture(stream, mode):  # noqa: N802
        if (err := stream_ok(stream)) != OK:
            return (err,)
        device.capturing[int(stream)] = []
        return (OK,)

    @values(1)
    def cudaStreamEndCapture(stream):  # noqa: N802
        if (err := stream_ok(stream)) != OK or int(stream) not in device.capturing:
            return err if err != OK else cudaError_t.cudaErrorInvalidValue, None
        return OK, cudaGraph_t(device.capturing.pop(int(stream)))

    @values(1)
    def cudaGraphInstantiate(graph, flags):  # noqa: N802
        if not isinstance(graph, cudaGraph_t):
            return cudaError_t.cudaErrorInvalidValue, None
        return OK, cudaGraphExec_t(graph.work)

    @values(0)
    def cudaGraphLaunch(exec_, stream):  # noqa: N802
        if (err := stream_ok(stream)) != OK:
            return (err,)
        if not isinstance(exec_, cudaGraphExec_t):
            return (cudaError_t.cudaErrorInvalidValue,)

        def work():
            device.replays += 1
            for step in exec_.work:
                step()

        device.enqueue(stream, work)
        return (OK,)

    @values(0)
    def cudaGraphExecDestroy(exec_):  # noqa: N802
        return (OK,)

    @values(0)
    def cudaGraphDestroy(graph):  # noqa: N802
        return (OK,)

    functions = [
        cudaSetDevice, cudaGetDevice, cudaGetDeviceCount, cudaGetDeviceProperties, cudaMalloc,
        cudaFree, cudaMemcpyAsync, cudaMemcpy2DAsync, cudaStreamCreateWithFlags,
        cudaStreamSynchronize, cudaDeviceSynchronize, cudaStreamDestroy, cudaStreamBeginCapture,
        cudaStreamEndCapture, cudaGraphInstantiate, cudaGraphLaunch, cudaGraphExecDestroy,
        cudaGraphDestroy,
    ]  # fmt: skip
    for fn in functions:
        setattr(rt, fn.__name__, api(fn))
    for value in (cudaMemcpyKind, cudaStreamCaptureMode, cudaDeviceProp, cudaError_t,
                  cudaStream_t, cudaGraph_t, cudaGraphExec_t):  # fmt: skip
        setattr(rt, value.__name__, value)
    rt.cudaStreamNonBlocking = 1
    return rt


# ---- folders and plans --------------------------------------------------------------------------
PLAN_MAGIC = b"SIMULATED-TRT-PLAN\n"


def write_plan(onnx_path: Path, out: Path) -> dict:
    """A simulated engine file for an ONNX graph; returns its manifest record {file, sha256}."""
    data = PLAN_MAGIC + Path(onnx_path).read_bytes()
    out.write_bytes(data)
    return {"file": out.name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def plan_name(graph: str, precision: str = "fp32") -> str:
    return f"{graph}.{precision}.trt{TRT_VERSION}.sm{SM[0]}{SM[1]}.plan"


def install(monkeypatch, wrap=None) -> Device:
    """Substitute the simulated `tensorrt` and `cuda.bindings.runtime` modules on a fresh device.
    `wrap(name, module)` may replace each module (the conformance tests' recording proxies)."""
    from tests.simulated_tensorrt import trt_module

    global DEVICE
    DEVICE = device = Device()
    wrap = wrap or (lambda name, module: module)
    rt = wrap("cuda.bindings.runtime", _cuda_module(device))
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, rt
    for name, module in {
        "tensorrt": wrap("tensorrt", trt_module(device)),
        "cuda": cuda,
        "cuda.bindings": bindings,
        "cuda.bindings.runtime": rt,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return device


def tensorrt_folder(source: Path, out: Path) -> Path:
    """A copy of an ONNX Runtime engine folder with a simulated TensorRT engine per graph."""
    import shutil

    shutil.copytree(source, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for name, entry in manifest["graphs"].items():
        entry["engine"] = write_plan(out / entry["file"], out / plan_name(name))
    manifest.update(tensorrt=TRT_VERSION, compute_capability=f"{SM[0]}.{SM[1]}")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def picture(colour=(40, 80, 220), side=64) -> np.ndarray:
    """A test image for understanding: one flat square on white."""
    image = np.full((side, side, 3), 255, np.uint8)
    image[8:28, 30:50] = colour
    return image
