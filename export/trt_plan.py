"""TensorRT engine plans as plain data: precision per GPU, profiles, flags, file names, cache keys.

TensorRT cannot be installed in this workplace, so every decision a build makes lives here, where
it is unit-tested without TensorRT; `export.trt_build` only hands a plan to the TensorRT API.

- Precision is one value. `auto` picks FP8 on SM >= 8.9, INT8 on Jetson Orin (SM 8.7, Ampere: no
  FP8) and FP16 elsewhere; an explicit request the GPU cannot run is an error saying what to use.
  That decision and the GPU table live in `runtime.machine.hardware`, shared with `runtime doctor`.
- Every network is built STRONGLY_TYPED: precision comes from the ONNX itself (an fp16/bf16 graph,
  or a Q/DQ INT8/FP8 graph), with norms, softmax and RoPE left in fp32 where the exporter put them.
  No FP16/BF16/INT8/FP8 builder flags are set (TensorRT rejects them on strongly typed networks),
  and a naive `--fp16` build is what wrecks the vision tower (cosine 0.14 vs 0.9997 typed).
- TF32 is off: TensorRT turns `BuilderFlag.TF32` on by default, which computes fp32 matmuls and
  convolutions with 10-bit mantissas. Our fp32 is fp32: the whole of an fp32 engine, and the
  layers 16-bit and Q/DQ graphs keep in fp32 on purpose (norms, softmax, excluded modules), so
  every plan clears it (`cleared_flags`), and the cache key says so.
- Profiles are `runtime.folder.spec.trt_profile(spec)`, never re-typed. CUDA graphs need static
  shapes:
  the step graphs have a dynamic `batch` (`cfg_batch` = 2 x batch for the CFG graphs), so
  `static_batch=B` pins those dims to min = opt = max = B (2B), which gives a static engine.
- Engines do not survive a TensorRT or GPU-architecture change, so the file name carries precision,
  TensorRT version and SM, and the cache key hashes the content (ONNX sha256, precision, TensorRT
  version, SM, profiles, flags), never the existence of a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass

from runtime.folder.spec import PRECISIONS, Dim, GraphSpec, io_dtype, trt_profile

# re-exported: the GPU table is plain data there
from runtime.machine.hardware import (  # noqa: F401
    BF16_MIN_SM,
    FP8_MIN_SM,
    GPU,
    GPUS,
    INT8_MIN_SM,
    REQUESTS,
    gpu,
    resolve_precision,
    supports,
)
from runtime.machine.hardware import check_sm as _check_sm

NETWORK_FLAGS = ("STRONGLY_TYPED",)
BUILDER_FLAGS: tuple[str, ...] = ()  # precision flags are forbidden on strongly typed networks
CLEARED_FLAGS = ("TF32",)  # on by default in TensorRT; fp32 layers stay fp32 (module docstring)
DEFAULT_WORKSPACE_BYTES = 4 << 30
BATCH_DIMS = {"batch": 1, "cfg_batch": 2}  # dim -> multiple of static_batch it is pinned to
_VERSION = re.compile(r"^\d+(\.\d+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def engine_file_name(
    graph: str,
    precision: str,
    trt_version: str,
    sm: tuple[int, int],
    static_batch: int | None = None,
) -> str:
    """`dit_step.fp8.trt10.8.0.sm90.plan`; a batch-pinned engine adds `.b<B>` after the graph."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    major, minor = _check_sm(sm)
    pinned = f".b{static_batch}" if static_batch is not None else ""
    return f"{graph}{pinned}.{precision}.trt{_check_version(trt_version)}.sm{major}{minor}.plan"


def timing_cache_name(trt_version: str, sm: tuple[int, int]) -> str:
    """One timing cache per TensorRT version and GPU architecture, shared by all graphs."""
    major, minor = _check_sm(sm)
    return f"timing.trt{_check_version(trt_version)}.sm{major}{minor}.cache"


def _check_version(trt_version: str) -> str:
    if not isinstance(trt_version, str) or not _VERSION.match(trt_version):
        raise ValueError(f"TensorRT version must look like '10.8.0', got {trt_version!r}")
    return trt_version


def cache_key(
    *,
    onnx_sha256: str,
    precision: str,
    trt_version: str,
    sm: tuple[int, int],
    profiles: tuple[dict, ...] | list[dict],
    flags: tuple[str, ...] | list[str],
) -> str:
    """sha256 over a canonical JSON of everything an engine's content depends on.

    Names and paths are not part of it: the same ONNX bytes built the same way give the same key.
    """
    if not isinstance(onnx_sha256, str) or not _SHA256.match(onnx_sha256):
        raise ValueError(f"onnx_sha256 must be 64 lowercase hex digits, got {onnx_sha256!r}")
    identity = {
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "trt_version": _check_version(trt_version),
        "sm": list(_check_sm(sm)),
        "profiles": [_profile_json(p) for p in profiles],
        "flags": sorted(flags),
    }
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _profile_json(profile: dict) -> dict:
    return {name: [list(s) for s in shapes] for name, shapes in profile.items()}


@dataclass(frozen=True)
class EnginePlan:
    """Everything one engine build needs, as plain data.

    `profiles` are `trt_profile(spec)` dicts {input: (min, opt, max)}; `dynamic_dims` lists the
    dims whose range is left open. `cuda_graph` is True when none is (a static engine can be
    captured into a CUDA graph); pin the batch with `static_batch` to get there for the
    generation graphs. `input_dtypes` are the I/O dtypes the ONNX must carry at this precision
    (a strongly typed build of an ONNX in the wrong precision would silently give that precision).
    """

    graph: str
    onnx_file: str
    onnx_sha256: str
    precision: str
    input_dtypes: dict[str, str]
    trt_version: str
    sm: tuple[int, int]
    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...]
    cleared_flags: tuple[str, ...]
    profiles: tuple[dict[str, tuple[tuple[int, ...], ...]], ...]
    workspace_bytes: int
    static_batch: int | None
    dynamic_dims: tuple[str, ...]
    cuda_graph: bool
    engine_file: str
    cache_key: str

    @property
    def flags(self) -> tuple[str, ...]:
        """The flags the cache key hashes: network and builder flags set, `-NAME` cleared."""
        return key_flags(self.network_flags, self.builder_flags, self.cleared_flags)


def key_flags(network, builder, cleared) -> tuple[str, ...]:
    return tuple(network) + tuple(builder) + tuple(f"-{f}" for f in cleared)


def input_dtypes(spec: GraphSpec, precision: str) -> dict[str, str]:
    """{input: dtype name}: `float` inputs take the precision's I/O dtype, the rest keep theirs."""
    return {t.name: io_dtype(precision) if t.dtype == "float" else t.dtype for t in spec.inputs}


def pin_batch(spec: GraphSpec, static_batch: int) -> GraphSpec:
    """The spec with `batch` pinned to B and `cfg_batch` to 2B (min = opt = max)."""
    if not isinstance(static_batch, int) or static_batch < 1:
        raise ValueError(f"static_batch must be a positive int, got {static_batch!r}")
    dims = []
    for d in spec.dims:
        if d.name in BATCH_DIMS:
            size = BATCH_DIMS[d.name] * static_batch
            if not d.min <= size <= d.max:
                raise ValueError(
                    f"{spec.name}: static_batch={static_batch} puts {d.name}={size} outside its "
                    f"range [{d.min}, {d.max}]"
                )
            d = Dim(d.name, size, size, size)
        dims.append(d)
    return dataclasses.replace(spec, dims=tuple(dims))


def plan_engines(
    specs: dict[str, GraphSpec],
    onnx_files: dict[str, dict],
    *,
    precision: str,
    sm: tuple[int, int],
    trt_version: str,
    graphs: list[str] | tuple[str, ...] | None = None,
    static_batch: int | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> list[EnginePlan]:
    """One `EnginePlan` per graph (all of `specs`, or `graphs` in that order).

    `onnx_files` maps a graph to `{"file": ..., "sha256": ...}` of its exported ONNX, which must
    already be in the resolved precision (resolve `auto` with `resolve_precision` before export).
    """
    precision = resolve_precision(precision, sm)
    names = list(specs) if graphs is None else list(graphs)
    unknown = [g for g in names if g not in specs]
    if unknown:
        raise ValueError(f"unknown graph(s) {unknown}; valid: {', '.join(specs)}")
    missing = [g for g in names if g not in onnx_files]
    if missing:
        raise ValueError(f"no ONNX file for graph(s) {missing}; have: {', '.join(onnx_files)}")
    if not isinstance(workspace_bytes, int) or workspace_bytes <= 0:
        raise ValueError(f"workspace_bytes must be a positive int, got {workspace_bytes!r}")
    flags = key_flags(NETWORK_FLAGS, BUILDER_FLAGS, CLEARED_FLAGS)
    plans = []
    for name in names:
        spec = specs[name]
        if static_batch is not None:
            spec = pin_batch(spec, static_batch)
        pinned = static_batch if any(d.name in BATCH_DIMS for d in spec.dims) else None
        profiles = (trt_profile(spec),)  # one profile; TensorRT takes several if ever needed
        onnx = onnx_files[name]
        identity = {"precision": precision, "trt_version": trt_version, "sm": sm, "flags": flags}
        key = cache_key(onnx_sha256=onnx["sha256"], profiles=profiles, **identity)
        plans.append(
            EnginePlan(
                graph=name,
                onnx_file=str(onnx["file"]),
                onnx_sha256=onnx["sha256"],
                precision=precision,
                input_dtypes=input_dtypes(spec, precision),
                trt_version=trt_version,
                sm=_check_sm(sm),
                network_flags=NETWORK_FLAGS,
                builder_flags=BUILDER_FLAGS,
                cleared_flags=CLEARED_FLAGS,
                profiles=profiles,
                workspace_bytes=workspace_bytes,
                static_batch=pinned,
                dynamic_dims=tuple(d.name for d in spec.dims if not d.static),
                cuda_graph=spec.static,
                engine_file=engine_file_name(name, precision, trt_version, sm, pinned),
                cache_key=key,
            )
        )
    return plans


def plan_to_dict(plan: EnginePlan) -> dict:
    """A JSON-ready dict (profiles as {input: [min, opt, max]} lists) for the manifest."""
    data = dataclasses.asdict(plan)
    data["profiles"] = [_profile_json(p) for p in plan.profiles]
    return json.loads(json.dumps(data))
