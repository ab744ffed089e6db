"""A token job's KV cache in host memory: what ONNX Runtime on CPU reads without a copy.

One preallocated `(L, B, KV, capacity, D)` buffer per side, sized once for the prompt and
`max_new_tokens`; prefill writes its first rows, each decode step one row, in place. The decode
graph reads it through fixed per-layer views (`cache_keys.{i}`, `cache_values.{i}`). Backends
with device memory give their own cache (`session.kv_cache`, e.g. TensorRT's `DeviceKVCache`).
"""

from __future__ import annotations

import numpy as np

from runtime.folder.graphs import cache_feeds


class HostKVCache:
    """A token job's KV cache as host arrays: what ONNX Runtime on CPU (and any backend without
    its own `kv_cache`) reads without a copy. `write` takes the backend's arrays."""

    def __init__(self, shape: tuple[int, ...], dtype, to_host) -> None:
        self.keys = np.zeros(shape, dtype)  # (L, B, KV, C, D)
        self.values = np.zeros(shape, dtype)
        self.capacity, self._to_host = shape[3], to_host
        self._feeds = cache_feeds(self.keys, self.values)  # fixed views: built once

    def write(self, start: int, keys, values) -> None:
        """Rows start.. of the cache from (L, B, KV, n, D) keys / values."""
        keys, values = self._to_host(keys), self._to_host(values)
        self.keys[..., start : start + keys.shape[3], :] = keys
        self.values[..., start : start + values.shape[3], :] = values

    def feeds(self) -> dict[str, np.ndarray]:
        """The decode graph's per-layer cache inputs: views of this cache, no copy."""
        return self._feeds

    def close(self) -> None:
        self.keys = self.values = self._feeds = None
