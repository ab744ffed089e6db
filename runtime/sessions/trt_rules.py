"""TensorRT session rules as pure functions: buffer plans, engine compatibility, I/O checks.

Every decision the TensorRT session makes that does not need TensorRT or CUDA lives here, so it
is tested on any machine: the buffers a session allocates (from the spec, at the profile max),
the activation pool's size, the input shapes it sets, whether an engine file may be deserialized
here (TensorRT version, compute capability, sha256), whether an engine's I/O is the spec's (names,
dtypes under TensorRT's own `DataType` names, every tensor in device memory), and the 256-byte
alignment TensorRT demands of every tensor address (`aligned`, `padded`).
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np

from runtime.folder.manifest import EngineFolderError, rebuild_hint
from runtime.folder.spec import (
    GraphSpec,
    check_feeds,
    numpy_dtype,
    profile_sizes,
    resolve_shape,
)

# TensorRT requires 256-byte aligned tensor addresses (`set_tensor_address` returns False on
# others); cudaMalloc returns 256-byte aligned memory, views into it must keep the alignment.
POOL_ALIGN = 256
# tensorrt.DataType member names (TensorRT 10.3 - 11.x) -> numpy dtype names.
TRT_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
    "FP8": "float8_e4m3fn",
    "INT4": "int4",
}
_ENGINE_NAME = re.compile(r"\.trt(\d+(?:\.\d+)*)\.sm(\d+)(\d)\.plan$")


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


def padded(nbytes: int, align: int = POOL_ALIGN) -> int:
    """`nbytes` rounded up to a multiple of `align`."""
    return -(-int(nbytes) // align) * align


def aligned(ptr: int, align: int = POOL_ALIGN) -> bool:
    """Whether a device address is one TensorRT accepts for a tensor (256-byte aligned)."""
    return int(ptr) % align == 0


def pool_size(sizes: list[int]) -> int:
    """Bytes of one activation buffer shared by engines run in sequence: the max, aligned."""
    bad = [s for s in sizes if not isinstance(s, int) or s < 0]
    if bad:
        raise ValueError(f"device memory sizes must be non-negative ints, got {bad}")
    return padded(max(sizes, default=0))


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


def engine_io_errors(spec: GraphSpec, precision: str, io: dict[str, tuple]) -> list:
    """Mismatches of an engine's I/O with the spec. `io`: {name: (mode, TensorRT dtype name)} or
    {name: (mode, dtype, location)}, mode 'input' | 'output', location 'DEVICE' | 'HOST' (a host
    tensor, e.g. a shape-tensor input, is read from host memory at enqueue: we bind device
    buffers only, so it is refused here rather than faulting on the GPU)."""
    errors = []
    for mode, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        have, names = sorted(n for n, (m, *_) in io.items() if m == mode), [t.name for t in tensors]
        if have != sorted(names):
            errors.append(f"engine {mode}s {have}, spec {mode}s {sorted(names)}")
        for t in (t for t in tensors if t.name in io):
            want, kind = str(numpy_dtype(t.dtype, precision)), io[t.name][1]
            if TRT_DTYPES.get(kind, kind.lower()) != want:
                errors.append(f"{t.name}: engine dtype {kind}, spec expects {want} at {precision}")
    for name, (mode, *rest) in io.items():
        if len(rest) > 1 and rest[1] != "DEVICE":
            errors.append(f"{name}: engine {mode} lives in {rest[1]} memory; only DEVICE is bound")
    return errors


def kv_layer_stride(layer_bytes: int) -> int:
    """Bytes between two layers' views in a device KV cache: the layer's bytes padded to the
    alignment TensorRT demands of every bound address (a (B, KV, C, D) 16-bit layer of an odd
    capacity C and D = 32 is 64-byte aligned only)."""
    return padded(layer_bytes)
