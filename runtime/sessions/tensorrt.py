"""TensorRT sessions: a deserialized engine, device I/O buffers, one stream, CUDA graph replay.

I/O buffers are allocated once from the spec (profile max; exact for a static spec). A run sets the
input shapes, puts the feeds in place and enqueues `execute_async_v3` on the stream:
- host (numpy) feeds are copied into the session's input buffers; a `DeviceArray` feed is bound
  by its address (no copy: a token job's KV cache is read where it lies), except in a captured
  CUDA graph, whose addresses are fixed, where it is copied into the input buffer;
- every output is copied, on the stream, out of the session's output buffer into a device
  buffer the returned `DeviceArray` owns (as TensorRT's diffusion demo copies what must outlive a
  call): an output stays valid after the session's next run and after `close()` (low-memory
  release), so jobs interleaved on one session never see each other's results. The buffer is
  freed when the last `DeviceArray` over it goes away.
A static spec (`export.trt_plan.pin_batch`) is captured into a CUDA graph on its first run, then
replayed. A `SharedDevice` (one per Generator) gives all its sessions one stream and one
`ActivationPool` (one buffer, the max of their `device_memory_size`): the engines run in sequence
on that stream, never concurrently. `tensorrt`/`cuda-python` (the `trt` extra) are imported only
where needed; every decision that does not need them is a pure function here, tested without a
GPU, and the control flow runs in the tests over a simulated device (`tests/simulated_device.py`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.folder.graphs import cache_names
from runtime.folder.manifest import EngineFolderError, rebuild_hint
from runtime.folder.spec import (
    GraphSpec,
    check_feeds,
    io_dtype,
    numpy_dtype,
    profile_sizes,
    resolve_shape,
)

log = logging.getLogger(__name__)

POOL_ALIGN = 256  # bytes; cudaMalloc returns 256-byte aligned memory anyway
_TRT_FLOATS = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}  # others: lower-case
_ENGINE_NAME = re.compile(r"\.trt(\d+(?:\.\d+)*)\.sm(\d+)(\d)\.plan$")
_INSTALL = "install the `trt` extra (pip install 'blip3o-edge[trt]') on a machine with a GPU"


# ---- pure decisions (no TensorRT, no CUDA) -------------------------------------------------------
def buffer_plan(spec: GraphSpec, sizes: dict[str, int], precision: str = "fp32") -> dict:
    """{tensor: (shape, numpy dtype, nbytes)} for every input and output at these symbol sizes."""
    plan = {}
    for t in spec.inputs + spec.outputs:
        shape, dtype = resolve_shape(t, sizes), numpy_dtype(t.dtype, precision)
        plan[t.name] = (shape, dtype, math.prod(shape) * dtype.itemsize)
    return plan


def max_buffer_plan(spec: GraphSpec, precision: str = "fp32") -> dict:
    """The buffers a session allocates: at the profile max (the exact shapes of a static spec)."""
    return buffer_plan(spec, profile_sizes(spec, "max"), precision)


def capturable(spec: GraphSpec) -> bool:
    """Whether runs can be captured into a CUDA graph: every dim pinned (min = max)."""
    return spec.static


def pool_size(sizes: list[int]) -> int:
    """Bytes of one activation buffer shared by engines run in sequence: the max, aligned."""
    bad = [s for s in sizes if not isinstance(s, int) or s < 0]
    if bad:
        raise ValueError(f"device memory sizes must be non-negative ints, got {bad}")
    return -(-max(sizes, default=0) // POOL_ALIGN) * POOL_ALIGN


def input_shapes(spec: GraphSpec, feeds_shapes: dict[str, tuple]) -> dict[str, tuple]:
    """The shapes to set on the context, in spec order, validated by `check_feeds` (names, ranks,
    fixed axes, symbols agreeing across inputs, sizes within the profile) on zero-copy stand-ins."""
    inputs = {t.name: t for t in spec.inputs}
    stand_ins = {}
    for name, shape in feeds_shapes.items():
        t = inputs.get(name)
        value = np.array(0.0) if t is None else np.array(t.low or 0, numpy_dtype(t.dtype))
        stand_ins[name] = np.broadcast_to(value, tuple(shape))
    check_feeds(spec, stand_ins)
    return {name: tuple(feeds_shapes[name]) for name in spec.input_names}


def check_engine_compat(entry: dict, trt_version: str, sm: tuple, manifest: dict | None = None):
    """Raise `EngineFolderError` when a graph's engine (manifest `graphs[name]`) was built for
    another TensorRT version or compute capability: engines survive neither. The message names
    the field, the value built for, the value found and the rebuild command (exact with
    `manifest`). Built-for values come from the engine file name (`x.fp8.trt10.8.0.sm90.plan`),
    else the manifest; versions match on their common prefix ('10.8.0' accepts '10.8.0.43')."""
    graph, engine = entry.get("spec", {}).get("name", "graph"), entry.get("engine") or {}
    hint = rebuild_hint(manifest or {"backend": "tensorrt"})
    if not engine:
        raise EngineFolderError(f"{graph} has no TensorRT engine in this folder; build: {hint}")
    match, manifest = _ENGINE_NAME.search(engine.get("file", "")), manifest or {}
    want_trt, want_sm = manifest.get("tensorrt"), manifest.get("compute_capability")
    want_sm = tuple(int(x) for x in want_sm.split(".")) if want_sm else None
    if match:
        want_trt, want_sm = match.group(1), (int(match.group(2)), int(match.group(3)))
    have, want = str(trt_version).split("."), str(want_trt).split(".")
    n = min(len(have), len(want))
    sm_text = lambda v: ".".join(map(str, v)) if v else None  # noqa: E731
    for field, built, found, ok in (
        ("TensorRT version", want_trt, trt_version, want_trt and have[:n] == want[:n]),
        ("compute capability", sm_text(want_sm), sm_text(sm), want_sm and want_sm == tuple(sm)),
    ):
        if not ok:
            raise EngineFolderError(
                f"{graph}: engine {engine.get('file')} was built for {field} {built}, but this "
                f"machine has {field} {found}; engines do not survive that change: "
                f"rebuild with: {hint}"
            )


def check_engine_bytes(data: bytes, entry: dict, path: Path, manifest: dict | None = None):
    """Raise `EngineFolderError` unless an engine file's bytes have the sha256 its manifest entry
    (`graphs[name]`) records: a TensorRT plan is code the GPU runs, never deserialized unchecked."""
    want = (entry.get("engine") or {}).get("sha256")
    if not want or hashlib.sha256(data).hexdigest() != want:
        hint = rebuild_hint(manifest or {"backend": "tensorrt"})
        raise EngineFolderError(
            f"{path} does not match the sha256 in the manifest ({want or 'none recorded'}): "
            f"corrupt or replaced; rebuild with: {hint}"
        )


def engine_io_errors(spec: GraphSpec, precision: str, io: dict[str, tuple[str, str]]) -> list:
    """Mismatches of an engine's I/O {name: ('input' | 'output', TensorRT dtype)} with the spec."""
    errors = []
    for mode, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        have, names = sorted(n for n, (m, _) in io.items() if m == mode), [t.name for t in tensors]
        if have != sorted(names):
            errors.append(f"engine {mode}s {have}, spec {mode}s {sorted(names)}")
        for t in (t for t in tensors if t.name in io):
            want, kind = str(numpy_dtype(t.dtype, precision)), io[t.name][1]
            if _TRT_FLOATS.get(kind, kind.lower()) != want:
                errors.append(f"{t.name}: engine dtype {kind}, spec expects {want} at {precision}")
    return errors


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


# ---- TensorRT / CUDA -----------------------------------------------------------------------------
def _imports():
    """(tensorrt, CUDA runtime bindings), or a RuntimeError naming the `trt` extra."""
    try:
        import tensorrt

        try:
            from cuda.bindings import runtime  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart as runtime
    except ImportError as err:
        raise RuntimeError(
            f"the tensorrt backend needs TensorRT >= 10.1 and cuda-python ({err.name} is "
            f"missing): {_INSTALL}"
        ) from err
    return tensorrt, runtime


def _ok(result):
    """Unwrap a cuda-python `(err, *values)` tuple, raising on an error."""
    err, values = result[0], result[1:]
    if getattr(err, "value", err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else (values or None)


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
            self.ptr, self.nbytes = int(_ok(rt.cudaMalloc(need))), need
        return self.ptr, self.nbytes

    def close(self, rt=None) -> None:
        if self.ptr:
            rt = rt or _imports()[1]
            _ok(rt.cudaDeviceSynchronize())
            _ok(rt.cudaFree(self.ptr))
        self.ptr = self.nbytes = 0


class DeviceBuffer:
    """One cudaMalloc'd allocation, freed (cudaFree, which waits for pending work on it) when the
    last reference goes: outputs and caches own their memory, no session does."""

    def __init__(self, rt, nbytes: int) -> None:
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(_ok(rt.cudaMalloc(self.nbytes)))
        self._finalizer = weakref.finalize(self, _free, rt, self.ptr)

    def free(self) -> None:
        self._finalizer()


def _free(rt, ptr: int) -> None:
    _ok(rt.cudaFree(ptr))


class SharedDevice:
    """What one Generator's TensorRT sessions share: a CUDA device, one non-blocking stream and
    one activation pool. Close it after the sessions (`Generator.close`)."""

    def __init__(self, device: str = "cuda") -> None:
        if not re.fullmatch(r"cuda(:\d+)?", str(device)):
            raise ValueError(f"TensorRT runs on device 'cuda' or 'cuda:N', got {device!r}")
        _, rt = _imports()
        self.device, self._rt = device, rt
        _ok(rt.cudaSetDevice(int(device[5:] or 0)))
        self.stream = _ok(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
        self.pool = ActivationPool()

    def close(self) -> None:
        if self.stream is not None:
            _ok(self._rt.cudaStreamSynchronize(self.stream))
            self.pool.close(self._rt)
            _ok(self._rt.cudaStreamDestroy(self.stream))
            self.stream = None


class DeviceKVCache:
    """A token job's KV cache in device memory: (L, B, KV, C, D) keys and values it owns, fed to
    the decode engine by address (one input per layer), rows written in place with one strided
    copy per side."""

    def __init__(self, rt, stream, shape: tuple[int, ...], dtype) -> None:
        self._rt, self._stream, dtype = rt, stream, np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        self._buffers = [DeviceBuffer(rt, nbytes) for _ in range(2)]
        self.keys, self.values = (
            DeviceArray(b.ptr, tuple(shape), dtype, stream, b) for b in self._buffers
        )
        self.capacity = shape[3]
        self._feeds = self._layer_views()  # fixed addresses: built once

    def write(self, start: int, keys, values) -> None:
        """Rows start..start+n of the cache from (L, B, KV, n, D) keys / values (device or host)."""
        rt, kinds = self._rt, self._rt.cudaMemcpyKind
        for dst, src in ((self.keys, keys), (self.values, values)):
            *outer, n, d = src.shape
            if tuple(outer) != dst.shape[:3] or d != dst.shape[4] or start + n > self.capacity:
                raise ValueError(f"cannot write {tuple(src.shape)} at row {start} of {dst.shape}")
            if src.dtype != dst.dtype:
                raise ValueError(f"KV rows are {src.dtype}, the cache is {dst.dtype}")
            item = dst.dtype.itemsize
            if isinstance(src, DeviceArray):
                src_ptr, kind = src.ptr, kinds.cudaMemcpyDeviceToDevice
            else:
                src = np.ascontiguousarray(src)
                src_ptr, kind = src.ctypes.data, kinds.cudaMemcpyHostToDevice
            _ok(
                rt.cudaMemcpy2DAsync(
                    dst.ptr + start * d * item,  # row `start` of the first (layer, batch, head)
                    self.capacity * d * item,  # destination pitch: one (layer, batch, head)
                    src_ptr,
                    n * d * item,  # source pitch
                    n * d * item,  # bytes per (layer, batch, head)
                    math.prod(outer),  # L * B * KV of them
                    kind,
                    self._stream,
                )
            )
            if not isinstance(src, DeviceArray):
                _ok(rt.cudaStreamSynchronize(self._stream))  # the host array may go away

    def feeds(self) -> dict[str, DeviceArray]:
        """The decode engine's per-layer cache inputs: (B, KV, C, D) views into this cache's
        buffers (layer i at offset i * layer bytes), bound by address, never copied."""
        return self._feeds

    def _layer_views(self) -> dict[str, DeviceArray]:
        layers = []
        for side in (self.keys, self.values):
            step, shape = side.nbytes // side.shape[0], side.shape[1:]
            layers.append(
                [
                    DeviceArray(side.ptr + i * step, shape, side.dtype, side.stream, side.owner)
                    for i in range(side.shape[0])
                ]
            )
        return {
            name: layer[i]
            for i, pair in enumerate(cache_names(self.keys.shape[0]))
            for name, layer in zip(pair, layers)
        }

    def close(self) -> None:
        self.keys = self.values = self._feeds = None
        self._buffers = []


class TrtSession:
    def __init__(
        self,
        spec: GraphSpec,
        path: str | Path,
        *,
        device: str = "cuda",
        precision: str = "fp32",
        stream=None,
        activation_pool: ActivationPool | None = None,
        cuda_graph: bool | None = None,
        shared: SharedDevice | None = None,
        record: tuple[dict, dict] | None = None,
    ) -> None:
        """`record`: (the manifest's graph entry, the manifest) of a folder's engine, checked
        before deserializing (compute capability, TensorRT version, size and sha256)."""
        io_dtype(precision)  # validates the precision name
        if cuda_graph and not capturable(spec):
            dynamic = [d.name for d in spec.dims if not d.static]
            raise ValueError(
                f"{spec.name}: cuda_graph=True needs every dim pinned, but {dynamic} "
                "are dynamic; build with a static batch (export.trt_plan.pin_batch)"
            )
        if not re.fullmatch(r"cuda(:\d+)?", str(device)):
            raise ValueError(f"TensorRT runs on device 'cuda' or 'cuda:N', got {device!r}")
        if shared is not None:
            stream, activation_pool = shared.stream, shared.pool
        self.spec, self.precision, self._closed = spec, precision, False
        self._graph_wanted = capturable(spec) if cuda_graph is None else cuda_graph
        index, (trt, rt), path = int(device[5:] or 0), _imports(), Path(path)
        self._rt = rt
        _ok(rt.cudaSetDevice(index))
        props = _ok(rt.cudaGetDeviceProperties(index))
        entry, manifest = record if record is not None else (None, None)
        data = path.read_bytes()  # hashed and deserialized from the same bytes
        if entry is not None:  # an engine of a folder: checked against the manifest's record
            check_engine_compat(entry, trt.__version__, (props.major, props.minor), manifest)
            check_engine_bytes(data, entry, path, manifest)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # outlives the engine
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise RuntimeError(
                f"TensorRT {trt.__version__} could not deserialize {path}; "
                f"rebuild with: {rebuild_hint(manifest)}"
            )
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {trt.TensorIOMode.INPUT: "input", trt.TensorIOMode.OUTPUT: "output"}
        io = {n: (modes[engine.get_tensor_mode(n)], engine.get_tensor_dtype(n).name) for n in names}
        if errors := engine_io_errors(spec, precision, io):
            raise ValueError(f"{path} does not match the {spec.name} spec: " + "; ".join(errors))
        self._engine, self._own_pool = engine, activation_pool is None
        self._pool = activation_pool or ActivationPool()
        self._pool.sizes[id(self)] = int(engine.device_memory_size_v2)
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self._context = engine.create_execution_context(strategy)
        self._plan = max_buffer_plan(spec, precision)
        self._buffers = {n: int(_ok(rt.cudaMalloc(max(p[2], 1)))) for n, p in self._plan.items()}
        self._addresses = dict(self._buffers)  # what each tensor is bound to now
        for name, ptr in self._buffers.items():
            self._context.set_tensor_address(name, ptr)
        self._own_stream = stream is None
        if stream is None:
            stream = _ok(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
        self.stream = rt.cudaStream_t(stream) if isinstance(stream, int) else stream
        self._bound = self._shapes = self._outs = self._graph = self._exec = None

    def run(self, feeds: dict[str, Any]) -> dict[str, DeviceArray]:
        if self._closed:
            raise RuntimeError(f"{self.spec.name}: the session is closed")
        rt, ctx, spec = self._rt, self._context, self.spec
        if all(isinstance(v, np.ndarray) for v in feeds.values()):
            check_feeds(spec, feeds, self.precision)  # integer ranges too: bad ids fault on GPU
        shapes = input_shapes(spec, {n: tuple(v.shape) for n, v in feeds.items()})
        ptr, size = self._pool.acquire(rt)
        if ptr != self._bound:  # first run, or the shared pool grew: rebind, recapture
            ctx.set_device_memory(ptr, size)
            self._bound = ptr
            self._drop_graph()
        if shapes != self._shapes:
            for name, shape in shapes.items():
                if not ctx.set_input_shape(name, shape):
                    raise ValueError(f"{spec.name}: TensorRT rejected shape {shape} for {name}")
            self._shapes = shapes
            self._outs = {n: tuple(ctx.get_tensor_shape(n)) for n in spec.output_names}
        for name in spec.input_names:
            self._place(name, feeds[name])
        if self._exec is not None:
            _ok(rt.cudaGraphLaunch(self._exec, self.stream))
        else:
            if not ctx.execute_async_v3(int(self.stream)):
                raise RuntimeError(f"{spec.name}: TensorRT execute_async_v3 failed")
            if self._graph_wanted:
                self._capture()
        return {n: self._copy_out(n, s) for n, s in self._outs.items()}

    def _place(self, name: str, value) -> None:
        """Put one feed where the engine reads it: bind a device array by address (unless a CUDA
        graph fixes the addresses), copy anything else into the session's input buffer."""
        rt, want, kinds = self._rt, self._plan[name][1], self._rt.cudaMemcpyKind
        if value.dtype != want:
            raise ValueError(f"{self.spec.name}.{name}: dtype {value.dtype}, expected {want}")
        target = self._buffers[name]
        if isinstance(value, DeviceArray):
            if value.stream is not None and int(value.stream) != int(self.stream):
                _ok(rt.cudaStreamSynchronize(value.stream))  # produced on another stream
            if not self._graph_wanted:
                self._bind(name, value.ptr)
                return
            src, nbytes, kind = value.ptr, value.nbytes, kinds.cudaMemcpyDeviceToDevice
        else:
            value = np.ascontiguousarray(value)
            src, nbytes, kind = value.ctypes.data, value.nbytes, kinds.cudaMemcpyHostToDevice
        self._bind(name, target)
        _ok(rt.cudaMemcpyAsync(target, src, nbytes, kind, self.stream))

    def _bind(self, name: str, ptr: int) -> None:
        if self._addresses[name] != ptr:
            self._context.set_tensor_address(name, ptr)
            self._addresses[name] = ptr

    def _copy_out(self, name: str, shape: tuple) -> DeviceArray:
        """Output `name` copied into a buffer the returned array owns (outlives this session's
        next run and its close)."""
        dtype = self._plan[name][1]
        nbytes = math.prod(shape) * dtype.itemsize
        out = DeviceBuffer(self._rt, nbytes)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        _ok(self._rt.cudaMemcpyAsync(out.ptr, self._buffers[name], nbytes, kind, self.stream))
        return DeviceArray(out.ptr, shape, dtype, self.stream, out)

    def kv_cache(self, shape: tuple[int, ...], dtype) -> DeviceKVCache:
        """A KV cache in device memory for a token job (owned by the job, not the session)."""
        return DeviceKVCache(self._rt, self.stream, shape, dtype)

    def _capture(self) -> None:
        """Capture the engine launch (not the feed copies) into a CUDA graph for later runs."""
        rt = self._rt
        try:
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            _ok(rt.cudaStreamBeginCapture(self.stream, mode))
            ok = self._context.execute_async_v3(int(self.stream))
            self._graph = _ok(rt.cudaStreamEndCapture(self.stream))
            if not ok:
                raise RuntimeError("execute_async_v3 failed during capture")
            self._exec = _ok(rt.cudaGraphInstantiate(self._graph, 0))
        except RuntimeError as err:
            log.warning("%s: CUDA graph capture failed (%s); running without", self.spec.name, err)
            self._graph_wanted = False
            self._drop_graph()

    def _drop_graph(self) -> None:
        if self._exec is not None:
            _ok(self._rt.cudaGraphExecDestroy(self._exec))
        if self._graph is not None:
            _ok(self._rt.cudaGraphDestroy(self._graph))
        self._graph = self._exec = None

    def to_host(self, value: Any) -> np.ndarray:
        if not isinstance(value, DeviceArray):
            return np.asarray(value)
        rt, out = self._rt, np.empty(value.shape, value.dtype)
        stream = value.stream if value.stream is not None else self.stream
        if self._own_stream and self._closed and stream is self.stream:
            raise RuntimeError(f"{self.spec.name}: the session and its stream are closed")
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _ok(rt.cudaMemcpyAsync(out.ctypes.data, value.ptr, value.nbytes, kind, stream))
        _ok(rt.cudaStreamSynchronize(stream))
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed, rt = True, self._rt
        _ok(rt.cudaStreamSynchronize(self.stream))
        self._drop_graph()
        self._context = self._engine = None
        for ptr in self._buffers.values():
            _ok(rt.cudaFree(ptr))
        self._pool.sizes.pop(id(self), None)
        if self._own_pool:
            self._pool.close(rt)
        if self._own_stream:
            _ok(rt.cudaStreamDestroy(self.stream))
