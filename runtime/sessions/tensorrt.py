"""TensorRT sessions: a deserialized engine, device I/O buffers, one stream, CUDA graph replay.

I/O buffers are allocated once from the spec (profile max; exact for a static spec). A run sets the
input shapes, puts the feeds in place and enqueues `execute_async_v3` on the stream:
- host (numpy) feeds are copied into the session's input buffers; a `DeviceArray` feed is bound
  by its address (no copy: a token job's KV cache is read where it lies), except in a captured
  CUDA graph, whose addresses are fixed, or when its address is not 256-byte aligned (TensorRT
  refuses those), where it is copied into the input buffer;
- every output is copied, on the stream, out of the session's output buffer into a device
  buffer the returned `DeviceArray` owns (as TensorRT's diffusion demo copies what must outlive a
  call): an output stays valid after the session's next run and after `close()` (low-memory
  release), so jobs interleaved on one session never see each other's results. The buffer is
  freed when the last `DeviceArray` over it goes away.
A static spec (`export.trt_plan.pin_batch`) is captured into a CUDA graph on its first run, then
replayed. A `SharedDevice` (one per Generator) gives all its sessions one stream and one
`ActivationPool` (one buffer, the max of their `device_memory_size_v2`): the engines run in
sequence on that stream, never concurrently. Every TensorRT call whose result says whether it
worked (`set_tensor_address`, `set_input_shape`, `execute_async_v3`) is checked, and every CUDA
result tuple (`cuda_memory.check`). The rules are pure functions (`trt_rules`), the memory is
`cuda_memory`'s, the KV cache `device_kv_cache`'s; the calls made here are checked against the
real TensorRT and cuda-python bindings in `tests/test_trt_conformance.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from runtime.folder.manifest import rebuild_hint
from runtime.folder.spec import GraphSpec, check_feeds, io_dtype
from runtime.sessions.cuda_memory import (  # noqa: F401 - re-exported
    INSTALL,
    ActivationPool,
    CudaError,
    DeviceArray,
    DeviceBuffer,
    SharedDevice,
    check,
    cuda_runtime,
    device_index,
    select,
    stream_handle,
)
from runtime.sessions.device_kv_cache import DeviceKVCache
from runtime.sessions.trt_rules import (  # noqa: F401 - re-exported
    POOL_ALIGN,
    aligned,
    buffer_plan,
    capturable,
    check_engine_bytes,
    check_engine_compat,
    engine_io_errors,
    input_shapes,
    max_buffer_plan,
    pool_size,
)

log = logging.getLogger(__name__)


def _imports():
    """(tensorrt, CUDA runtime bindings), or a RuntimeError naming the `trt` extras."""
    try:
        import tensorrt
    except ImportError as err:
        raise RuntimeError(
            f"the tensorrt backend needs TensorRT >= 10.3 and cuda-python ({err.name} is "
            f"missing): {INSTALL}"
        ) from err
    return tensorrt, cuda_runtime()


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
        index = device_index(device)
        if shared is not None:
            stream, activation_pool = shared.stream, shared.pool
        self.spec, self.precision, self._closed, self._index = spec, precision, False, index
        self._graph_wanted = capturable(spec) if cuda_graph is None else cuda_graph
        (trt, rt), path = _imports(), Path(path)
        self._rt = rt
        check(rt.cudaSetDevice(index), f"cudaSetDevice({index})")
        props = check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
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
        io = {
            n: (
                modes[engine.get_tensor_mode(n)],
                engine.get_tensor_dtype(n).name,
                engine.get_tensor_location(n).name,
            )
            for n in names
        }
        if errors := engine_io_errors(spec, precision, io):
            raise ValueError(f"{path} does not match the {spec.name} spec: " + "; ".join(errors))
        self._engine, self._own_pool = engine, activation_pool is None
        self._pool = activation_pool or ActivationPool()
        self._pool.sizes[id(self)] = int(engine.device_memory_size_v2)
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self._context = engine.create_execution_context(strategy)
        if self._context is None:
            raise RuntimeError(f"{spec.name}: TensorRT could not create an execution context")
        self._plan = max_buffer_plan(spec, precision)
        self._buffers = {
            n: int(check(rt.cudaMalloc(max(p[2], 1)), "cudaMalloc")) for n, p in self._plan.items()
        }
        self._addresses = {}  # what each tensor is bound to now
        for name, ptr in self._buffers.items():
            self._bind(name, ptr)
        self._own_stream = stream is None
        if stream is None:
            flags = rt.cudaStreamNonBlocking
            stream = check(rt.cudaStreamCreateWithFlags(flags), "cudaStreamCreateWithFlags")
        self.stream = rt.cudaStream_t(stream) if isinstance(stream, int) else stream
        self._bound = self._shapes = self._outs = self._graph = self._exec = None

    def run(self, feeds: dict[str, Any]) -> dict[str, DeviceArray]:
        if self._closed:
            raise RuntimeError(f"{self.spec.name}: the session is closed")
        rt, ctx, spec = self._rt, self._context, self.spec
        if all(isinstance(v, np.ndarray) for v in feeds.values()):
            check_feeds(spec, feeds, self.precision)  # integer ranges too: bad ids fault on GPU
        shapes = input_shapes(spec, {n: tuple(v.shape) for n, v in feeds.items()})
        select(rt, self._index)  # this thread's current device may be another
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
            check(rt.cudaGraphLaunch(self._exec, self.stream), "cudaGraphLaunch")
        else:
            if not ctx.execute_async_v3(stream_handle(self.stream)):
                raise RuntimeError(f"{spec.name}: TensorRT execute_async_v3 failed")
            if self._graph_wanted:
                self._capture()
        return {n: self._copy_out(n, s) for n, s in self._outs.items()}

    def _place(self, name: str, value) -> None:
        """Put one feed where the engine reads it: bind a device array by address (unless a CUDA
        graph fixes the addresses, or TensorRT would refuse the address), copy anything else into
        the session's input buffer."""
        rt, want, kinds = self._rt, self._plan[name][1], self._rt.cudaMemcpyKind
        if value.dtype != want:
            raise ValueError(f"{self.spec.name}.{name}: dtype {value.dtype}, expected {want}")
        target = self._buffers[name]
        if isinstance(value, DeviceArray):
            if value.stream is not None and stream_handle(value.stream) != stream_handle(
                self.stream
            ):
                check(rt.cudaStreamSynchronize(value.stream), "cudaStreamSynchronize")
            if not self._graph_wanted and aligned(value.ptr):
                self._bind(name, value.ptr)
                return
            src, nbytes, kind = value.ptr, value.nbytes, kinds.cudaMemcpyDeviceToDevice
        else:
            value = np.ascontiguousarray(value)
            src, nbytes, kind = value.ctypes.data, value.nbytes, kinds.cudaMemcpyHostToDevice
        self._bind(name, target)
        # from pageable host memory the call returns once the source is staged: `value` may go
        check(rt.cudaMemcpyAsync(target, src, nbytes, kind, self.stream), "cudaMemcpyAsync")

    def _bind(self, name: str, ptr: int) -> None:
        if self._addresses.get(name) != ptr:
            if not self._context.set_tensor_address(name, ptr):
                raise RuntimeError(
                    f"{self.spec.name}: TensorRT refused address {ptr:#x} for {name} "
                    f"({'' if aligned(ptr) else 'not '}256-byte aligned)"
                )
            self._addresses[name] = ptr

    def _copy_out(self, name: str, shape: tuple) -> DeviceArray:
        """Output `name` copied into a buffer the returned array owns (outlives this session's
        next run and its close)."""
        dtype = self._plan[name][1]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out = DeviceBuffer(self._rt, nbytes, self._index)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check(
            self._rt.cudaMemcpyAsync(out.ptr, self._buffers[name], nbytes, kind, self.stream),
            "cudaMemcpyAsync",
        )
        return DeviceArray(out.ptr, shape, dtype, self.stream, out)

    def kv_cache(self, shape: tuple[int, ...], dtype) -> DeviceKVCache:
        """A KV cache in device memory for a token job (owned by the job, not the session)."""
        select(self._rt, self._index)
        return DeviceKVCache(self._rt, self.stream, shape, dtype, self._index)

    def _capture(self) -> None:
        """Capture the engine launch (not the feed copies) into a CUDA graph for later runs."""
        rt = self._rt
        try:
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            check(rt.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
            ok = self._context.execute_async_v3(stream_handle(self.stream))
            self._graph = check(rt.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
            if not ok:
                raise RuntimeError("execute_async_v3 failed during capture")
            self._exec = check(rt.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")
        except RuntimeError as err:
            log.warning("%s: CUDA graph capture failed (%s); running without", self.spec.name, err)
            self._graph_wanted = False
            self._drop_graph()

    def _drop_graph(self) -> None:
        if self._exec is not None:
            check(self._rt.cudaGraphExecDestroy(self._exec), "cudaGraphExecDestroy")
        if self._graph is not None:
            check(self._rt.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
        self._graph = self._exec = None

    def to_host(self, value: Any) -> np.ndarray:
        if not isinstance(value, DeviceArray):
            return np.asarray(value)
        rt, out = self._rt, np.empty(value.shape, value.dtype)
        stream = value.stream if value.stream is not None else self.stream
        if self._own_stream and self._closed and stream is self.stream:
            raise RuntimeError(f"{self.spec.name}: the session and its stream are closed")
        select(rt, self._index)
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(
            rt.cudaMemcpyAsync(out.ctypes.data, value.ptr, value.nbytes, kind, stream),
            "cudaMemcpyAsync",
        )
        check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed, rt = True, self._rt
        select(rt, self._index)
        check(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self._drop_graph()
        self._context = self._engine = None
        for ptr in self._buffers.values():
            check(rt.cudaFree(ptr), "cudaFree")
        self._pool.sizes.pop(id(self), None)
        if self._own_pool:
            self._pool.close(rt)
        if self._own_stream:
            check(rt.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
