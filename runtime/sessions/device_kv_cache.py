"""A token job's KV cache in device memory, fed to the TensorRT decode engine by address.

Keys and values are each one allocation holding L layers of (B, KV, C, D); the decode engine
reads layer i as its inputs `cache_keys.i` / `cache_values.i` where it lies (no copy per token).
TensorRT refuses tensor addresses that are not 256-byte aligned, so layers sit `kv_layer_stride`
bytes apart (the layer's bytes padded to 256): at 16 bits with tiny's (KV 2, D 32) an odd
capacity would put every other layer 128 bytes off. Prefill writes the first rows, each decode
step one row, in place: one strided copy per side when layers are packed, one per layer and side
when they are padded.
"""

from __future__ import annotations

import math

import numpy as np

from runtime.folder.graphs import cache_names
from runtime.sessions.cuda_memory import DeviceArray, DeviceBuffer, check, select
from runtime.sessions.trt_rules import kv_layer_stride


class DeviceKVCache:
    """(L, B, KV, C, D) keys and values in device memory, owned by a token job; `feeds()` gives
    the decode engine's per-layer inputs, `write(start, keys, values)` rows in place."""

    def __init__(self, rt, stream, shape: tuple[int, ...], dtype, index: int = 0) -> None:
        self._rt, self._stream, self._index, dtype = rt, stream, index, np.dtype(dtype)
        self.shape, self.dtype = tuple(shape), dtype
        self.layer_bytes = math.prod(shape[1:]) * dtype.itemsize
        self.stride = kv_layer_stride(self.layer_bytes)  # bytes from one layer to the next
        self._buffers = [DeviceBuffer(rt, shape[0] * self.stride, index) for _ in range(2)]
        self.capacity = shape[3]
        self.layers = [  # keys, values: one (B, KV, C, D) view per layer, aligned
            [
                DeviceArray(b.ptr + i * self.stride, self.shape[1:], dtype, stream, b)
                for i in range(shape[0])
            ]
            for b in self._buffers
        ]
        self._feeds = {  # fixed addresses: built once
            name: side[i]
            for i, pair in enumerate(cache_names(shape[0]))
            for name, side in zip(pair, self.layers)
        }

    def write(self, start: int, keys, values) -> None:
        """Rows start..start+n of the cache from (L, B, KV, n, D) keys / values (device or host)."""
        rt, kinds = self._rt, self._rt.cudaMemcpyKind
        select(rt, self._index)
        for side, src in zip(self.layers, (keys, values)):
            *outer, n, d = src.shape
            if tuple(outer) != self.shape[:3] or d != self.shape[4] or start + n > self.capacity:
                raise ValueError(f"cannot write {tuple(src.shape)} at row {start} of {self.shape}")
            if src.dtype != self.dtype:
                raise ValueError(f"KV rows are {src.dtype}, the cache is {self.dtype}")
            item, host = self.dtype.itemsize, not isinstance(src, DeviceArray)
            if host:
                src = np.ascontiguousarray(src)
                src_ptr, kind = src.ctypes.data, kinds.cudaMemcpyHostToDevice
            else:
                src_ptr, kind = src.ptr, kinds.cudaMemcpyDeviceToDevice
            row, rows = n * d * item, math.prod(outer[1:])  # bytes per (batch, head); B * KV
            packed = self.stride == self.layer_bytes
            for i in [0] if packed else range(self.shape[0]):
                check(
                    rt.cudaMemcpy2DAsync(
                        side[i].ptr + start * d * item,  # row `start` of (layer i, batch 0, head 0)
                        self.capacity * d * item,  # destination pitch: one (layer, batch, head)
                        src_ptr + i * rows * row,  # layer i of the source
                        row,  # source pitch
                        row,  # bytes per (layer, batch, head)
                        rows * (self.shape[0] if packed else 1),
                        kind,
                        self._stream,
                    ),
                    "cudaMemcpy2DAsync",
                )
            if host:  # the host array may go away once the call returns
                check(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def feeds(self) -> dict[str, DeviceArray]:
        """The decode engine's per-layer cache inputs: (B, KV, C, D) views into this cache's
        buffers (layer i at offset i * stride), bound by address, never copied."""
        return self._feeds

    def to_host(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) as (L, B, KV, C, D) host arrays (for tests and debugging)."""
        rt, out = self._rt, []
        select(rt, self._index)
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for side in self.layers:
            host = np.empty(self.shape, self.dtype)
            for i, view in enumerate(side):
                dst = host[i].ctypes.data
                check(
                    rt.cudaMemcpyAsync(dst, view.ptr, view.nbytes, kind, self._stream),
                    "cudaMemcpyAsync",
                )
            out.append(host)
        check(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return out[0], out[1]

    def close(self) -> None:
        self.layers = self._feeds = None
        self._buffers = []
