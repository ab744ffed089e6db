"""Build one TensorRT engine from an `EnginePlan`: the only code here that needs `tensorrt`.

Every decision (precision, flags, profiles, workspace, file name, cache key) is made and tested in
`export.trt_plan`; this module hands the plan to the TensorRT Python API and writes the engine
atomically. TensorRT is the `trt` extra (`pip install blip3o-edge[trt]`) and is imported inside
functions, so the rest of the exporter imports without it. Its full builder cannot be installed
in this workplace: `tests/test_trt_build.py` runs only where it is; here the calls run over the
simulated builder (`tests/test_trt_simulated.py`) and are checked against the builder bindings
of TensorRT 10.3 and 11.4 (`tests/test_trt_conformance.py`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from export.trt_plan import EnginePlan
from runtime.machine.probe import tensorrt_version, visible_gpus

__all__ = ["build_engine", "compute_capability", "tensorrt_version"]

log = logging.getLogger(__name__)


def _tensorrt():
    try:
        import tensorrt
    except ImportError as err:
        raise RuntimeError(
            "building engines needs TensorRT >= 10.3: install the `trt` extra (pip install "
            "'blip3o-edge[trt]', CUDA 12; `trt-cu13` for CUDA 13) on a machine with an NVIDIA "
            "GPU, or use JetPack's TensorRT on a Jetson (docs/tensorrt.md)"
        ) from err
    return tensorrt


def compute_capability(device: int = 0) -> tuple[int, int] | None:
    """(major, minor) of a GPU: torch.cuda when it sees one, else `runtime.machine.probe`'s
    nvidia-smi
    or CUDA driver probe (the facts `runtime doctor` reports), else None."""
    try:
        import torch

        if torch.cuda.is_available():
            return tuple(torch.cuda.get_device_capability(device))
    except ImportError:
        pass
    gpus = visible_gpus()[0]
    return gpus[device].compute_capability if device < len(gpus) else None


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build_engine(
    plan: EnginePlan, onnx_path: str | Path, out_path: str | Path, *, timing_cache: Path
) -> Path:
    """Build `plan`'s engine from `onnx_path` into `out_path`; reuse and update `timing_cache`.

    The network is created with the plan's flags (STRONGLY_TYPED), so layer precisions come from
    the ONNX; the plan's cleared flags (TF32) are cleared. External weights are read from the
    ONNX file's folder.
    """
    trt = _tensorrt()
    onnx_path, out_path, timing_cache = Path(onnx_path), Path(out_path), Path(timing_cache)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{plan.graph}: TensorRT could not parse {onnx_path}: {errors}")
    _check_inputs(trt, plan, network, onnx_path)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.cleared_flags:  # TF32: on by default, and fp32 means fp32 here
        config.clear_flag(getattr(trt.BuilderFlag, name))
    for shapes in plan.profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning(
            "timing cache %s does not match this TensorRT/GPU; starting afresh", timing_cache
        )
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    log.info("building %s (%s) -> %s", plan.graph, plan.precision, out_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{plan.graph}: TensorRT engine build failed (see the log above)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_path, serialized)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(timing_cache, config.get_timing_cache().serialize())
    return out_path


def _check_inputs(trt, plan: EnginePlan, network, onnx_path: Path) -> None:
    """The ONNX's inputs must be the plan's, in the plan's dtypes (strongly typed takes them)."""
    dtypes = {
        "float32": trt.float32,
        "float16": trt.float16,
        "bfloat16": trt.bfloat16,
        "int64": trt.int64,
        "int32": trt.int32,
        "bool": trt.bool,
    }
    got = {network.get_input(i).name: network.get_input(i).dtype for i in range(network.num_inputs)}
    if set(got) != set(plan.input_dtypes):
        want = sorted(plan.input_dtypes)
        raise RuntimeError(f"{plan.graph}: {onnx_path} has inputs {sorted(got)}, the plan {want}")
    wrong = {n: str(got[n]) for n, d in plan.input_dtypes.items() if got[n] != dtypes[d]}
    if wrong:
        raise RuntimeError(
            f"{plan.graph}: {onnx_path} input dtypes {wrong} differ from the {plan.precision} "
            f"plan's {plan.input_dtypes}: export the ONNX in the plan's precision"
        )
