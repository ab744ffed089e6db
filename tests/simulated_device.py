"""A simulated CUDA device and TensorRT, in numpy, for testing `runtime.sessions.tensorrt` on CPU.

`install(monkeypatch)` puts fake `tensorrt`, `cuda`, `cuda.bindings` and `cuda.bindings.runtime`
modules into `sys.modules`, so the TensorRT session's own imports pick them up and its control
flow runs unchanged. The fakes keep the rules a GPU enforces, loudly:

- device memory is numbered allocations (never reused); reading or writing an address that is
  freed, unknown, or past the end of its allocation raises `SimulatedDeviceError`, as does
  freeing twice or using a destroyed stream;
- an engine reads its inputs and writes its outputs at the addresses bound on its context when
  it runs (`set_tensor_address`); a captured CUDA graph replays with the addresses bound at
  capture, whatever was bound since; the activation memory (`set_device_memory`) must be alive
  and large enough, and is overwritten with garbage on every run (as another engine sharing it
  would), so nothing may rely on it between runs;
- engines compute for real: a plan file made by `write_plan` holds the graph's ONNX, run by
  ONNX Runtime, so results can be compared with the onnxruntime backend.
Work is executed eagerly when enqueued (one stream order is all the runtime relies on).
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np

PLAN_MAGIC = b"SIMULATED-TRT-PLAN\n"
TRT_VERSION, SM = "10.8.0", (9, 0)
_TRT_DTYPES = {"float": "FLOAT", "float16": "HALF", "int64": "INT64", "int32": "INT32"}


class SimulatedDeviceError(RuntimeError):
    pass


class Device:
    """The memory, streams and graphs of one simulated GPU; counters for the tests."""

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}  # base address -> bytes
        self.freed: dict[int, int] = {}  # base address -> size of freed allocations
        self.next = 0x10000
        self.streams: set[int] = set()
        self.next_stream = 1
        self.capturing: dict[int, list] = {}  # stream -> recorded launches
        self.launches = self.replays = self.executions = 0

    # memory ----------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        if nbytes <= 0:
            raise SimulatedDeviceError(f"cudaMalloc of {nbytes} bytes")
        ptr, self.next = self.next, self.next + ((nbytes + 255) // 256 + 1) * 256
        self.memory[ptr] = np.full(nbytes, 0xAB, np.uint8)  # garbage, like fresh cudaMalloc
        return ptr

    def free(self, ptr: int) -> None:
        if ptr not in self.memory:
            state = "already freed" if ptr in self.freed else "never allocated"
            raise SimulatedDeviceError(f"cudaFree({ptr:#x}): {state}")
        self.freed[ptr] = len(self.memory.pop(ptr))

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

    # streams ---------------------------------------------------------------------------------
    def stream(self, stream) -> int:
        handle = int(stream)
        if handle not in self.streams:
            raise SimulatedDeviceError(f"stream {handle} does not exist (destroyed?)")
        return handle

    def enqueue(self, stream, work) -> None:
        """Run `work` now, or record it when the stream is capturing (only engine launches may
        be captured: the runtime captures nothing else)."""
        handle = self.stream(stream)
        if handle in self.capturing:
            self.capturing[handle].append(work)
        else:
            work()


DEVICE: Device | None = None


# ---- cuda.bindings.runtime ----------------------------------------------------------------------
def _cuda_module(device: Device) -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToHost = 0
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    class cudaStreamCaptureMode(enum.IntEnum):
        cudaStreamCaptureModeGlobal = 0
        cudaStreamCaptureModeThreadLocal = 1

    class cudaStream_t(int):
        pass

    ok = 0

    def props(index):
        return ok, types.SimpleNamespace(major=SM[0], minor=SM[1], name="Simulated GPU")

    def malloc(nbytes):
        return ok, device.malloc(int(nbytes))

    def free(ptr):
        device.free(int(ptr))
        return (ok,)

    def _host(ptr: int, nbytes: int) -> np.ndarray:
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))

    def _src(ptr, nbytes, kind):
        on_device = kind in (
            cudaMemcpyKind.cudaMemcpyDeviceToHost,
            cudaMemcpyKind.cudaMemcpyDeviceToDevice,
        )
        return device.view(ptr, nbytes) if on_device else _host(ptr, nbytes)

    def _dst(ptr, nbytes, kind):
        on_device = kind in (
            cudaMemcpyKind.cudaMemcpyHostToDevice,
            cudaMemcpyKind.cudaMemcpyDeviceToDevice,
        )
        return device.view(ptr, nbytes) if on_device else _host(ptr, nbytes)

    def memcpy_async(dst, src, nbytes, kind, stream):
        def work():
            _dst(int(dst), int(nbytes), kind)[:] = _src(int(src), int(nbytes), kind)

        device.enqueue(stream, work)
        return (ok,)

    def memcpy2d_async(dst, dpitch, src, spitch, width, height, kind, stream):
        def work():
            for row in range(int(height)):
                d = _dst(int(dst) + row * int(dpitch), int(width), kind)
                d[:] = _src(int(src) + row * int(spitch), int(width), kind)

        device.enqueue(stream, work)
        return (ok,)

    def stream_create(flags):
        handle, device.next_stream = device.next_stream, device.next_stream + 1
        device.streams.add(handle)
        return ok, cudaStream_t(handle)

    def stream_sync(stream):
        device.stream(stream)
        return (ok,)

    def stream_destroy(stream):
        device.streams.discard(device.stream(stream))
        return (ok,)

    def begin_capture(stream, mode):
        device.capturing[device.stream(stream)] = []
        return (ok,)

    def end_capture(stream):
        return ok, ("graph", device.capturing.pop(device.stream(stream)))

    def instantiate(graph, flags):
        return ok, ("exec", list(graph[1]))

    def launch(exec_, stream):
        def work():
            device.replays += 1
            for step in exec_[1]:
                step()

        device.enqueue(stream, work)
        return (ok,)

    names = {
        "cudaSetDevice": lambda index: (ok,),
        "cudaGetDeviceProperties": props,
        "cudaMalloc": malloc,
        "cudaFree": free,
        "cudaMemcpyAsync": memcpy_async,
        "cudaMemcpy2DAsync": memcpy2d_async,
        "cudaStreamCreateWithFlags": stream_create,
        "cudaStreamNonBlocking": 1,
        "cudaStreamSynchronize": stream_sync,
        "cudaStreamDestroy": stream_destroy,
        "cudaDeviceSynchronize": lambda: (ok,),
        "cudaStreamBeginCapture": begin_capture,
        "cudaStreamEndCapture": end_capture,
        "cudaGraphInstantiate": instantiate,
        "cudaGraphLaunch": launch,
        "cudaGraphExecDestroy": lambda e: (ok,),
        "cudaGraphDestroy": lambda g: (ok,),
        "cudaMemcpyKind": cudaMemcpyKind,
        "cudaStreamCaptureMode": cudaStreamCaptureMode,
        "cudaStream_t": cudaStream_t,
    }
    for name, value in names.items():
        setattr(rt, name, value)
    return rt


# ---- tensorrt -----------------------------------------------------------------------------------
def write_plan(onnx_path: Path, out: Path) -> dict:
    """A simulated engine file for an ONNX graph; returns its manifest record {file, sha256}."""
    data = PLAN_MAGIC + Path(onnx_path).read_bytes()
    out.write_bytes(data)
    return {"file": out.name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def plan_name(graph: str, precision: str = "fp32") -> str:
    return f"{graph}.{precision}.trt{TRT_VERSION}.sm{SM[0]}{SM[1]}.plan"


def _trt_module(device: Device) -> types.ModuleType:
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = TRT_VERSION

    class TensorIOMode(enum.Enum):
        INPUT = 1
        OUTPUT = 2

    class ExecutionContextAllocationStrategy(enum.Enum):
        STATIC = 0
        USER_MANAGED = 2

    class Logger:
        WARNING = 2

        def __init__(self, level=None) -> None:
            pass

    class DataType:
        def __init__(self, name):
            self.name = name

    class Engine:
        def __init__(self, onnx: bytes) -> None:
            self.session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
            ins, outs = self.session.get_inputs(), self.session.get_outputs()
            self.io = [(t, TensorIOMode.INPUT) for t in ins] + [
                (t, TensorIOMode.OUTPUT) for t in outs
            ]
            self.num_io_tensors = len(self.io)
            self.device_memory_size_v2 = 4096

        def get_tensor_name(self, i):
            return self.io[i][0].name

        def _tensor(self, name):
            return next(t for t, _ in self.io if t.name == name)

        def get_tensor_mode(self, name):
            return next(m for t, m in self.io if t.name == name)

        def get_tensor_dtype(self, name):
            kind = self._tensor(name).type[len("tensor(") : -1]
            return DataType(_TRT_DTYPES.get(kind, kind.upper()))

        def create_execution_context(self, strategy):
            if strategy is not ExecutionContextAllocationStrategy.USER_MANAGED:
                raise SimulatedDeviceError("the runtime manages activation memory itself")
            return Context(self)

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine, self.addresses, self.shapes = engine, {}, {}
            self.memory = None

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = int(ptr)
            return True

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(int(n) for n in shape)
            self._outputs = None
            return True

        def set_device_memory(self, ptr, size):
            self.memory = (int(ptr), int(size))

        def _dtype(self, name):
            kind = self.engine._tensor(name).type[len("tensor(") : -1]
            return np.dtype("float32" if kind == "float" else kind)

        def _run(self, addresses, shapes):
            """Read inputs at `addresses`, run ONNX Runtime, return {output: array}."""
            feeds = {}
            for t, mode in self.engine.io:
                if mode is TensorIOMode.INPUT:
                    shape, dtype = shapes[t.name], self._dtype(t.name)
                    raw = device.view(addresses[t.name], int(np.prod(shape)) * dtype.itemsize)
                    feeds[t.name] = raw.view(dtype).reshape(shape).copy()
            names = [t.name for t, m in self.engine.io if m is TensorIOMode.OUTPUT]
            return dict(zip(names, self.engine.session.run(names, feeds)))

        def get_tensor_shape(self, name):
            if getattr(self, "_outputs", None) is None:  # shape inference: run on zeros
                names = [t.name for t, m in self.engine.io if m is TensorIOMode.OUTPUT]
                zeros = {n: np.zeros(s, self._dtype(n)) for n, s in self.shapes.items()}
                outs = self.engine.session.run(names, zeros)
                self._outputs = {n: o.shape for n, o in zip(names, outs)}
            return self._outputs[name]

        def execute_async_v3(self, stream):
            addresses, shapes, memory = dict(self.addresses), dict(self.shapes), self.memory

            def work():
                device.executions += 1
                if memory is None:
                    raise SimulatedDeviceError("execute without set_device_memory")
                scratch = device.view(memory[0], memory[1])
                if memory[1] < self.engine.device_memory_size_v2:
                    raise SimulatedDeviceError("activation memory smaller than the engine needs")
                outputs = self._run(addresses, shapes)
                scratch[:] = np.random.default_rng().integers(0, 255, scratch.size, np.uint8)
                for name, value in outputs.items():
                    value = np.ascontiguousarray(value)
                    device.view(addresses[name], value.nbytes)[:] = value.view(np.uint8).ravel()

            device.launches += 1
            device.enqueue(stream, work)
            return True

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, data):
            if not bytes(data).startswith(PLAN_MAGIC):
                return None
            return Engine(bytes(data)[len(PLAN_MAGIC) :])

    for name, value in {
        "TensorIOMode": TensorIOMode,
        "ExecutionContextAllocationStrategy": ExecutionContextAllocationStrategy,
        "Logger": Logger,
        "Runtime": Runtime,
    }.items():
        setattr(trt, name, value)
    return trt


def install(monkeypatch) -> Device:
    """Substitute the simulated `tensorrt` and `cuda.bindings.runtime` modules; a fresh device."""
    global DEVICE
    DEVICE = device = Device()
    rt = _cuda_module(device)
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, rt
    for name, module in {
        "tensorrt": _trt_module(device),
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
