"""The `engine:<graph>` stage: a TensorRT engine built from the graph's final ONNX.

The ONNX is the `export:` stage's, or the `quantize:` stage's Q/DQ graph for INT8/FP8 folders;
the engine's plan (`export.trt_plan`) decides its profiles, flags, file name and key, which
hashes that ONNX, the precision, TensorRT's version and the GPU. All engines of a folder share
one timing cache per TensorRT version and GPU architecture.
"""

from __future__ import annotations

from pathlib import Path

import export.trt_build as trt_build
from export.build_folder import BuildFolder, Stage
from export.trt_plan import plan_engines, timing_cache_name


def engine_stage(
    name: str, spec, onnx_record: dict, engine: BuildFolder, *, precision: str, sm, trt
) -> Stage:
    """Graph `name`'s engine from `onnx_record`, the manifest record of the stage that made its
    ONNX (TensorRT `trt` on a GPU of compute capability `sm`)."""
    onnx_file = onnx_record["onnx"]
    sha = next(f["sha256"] for f in onnx_record["files"] if f["file"] == onnx_file)
    (plan,) = plan_engines(
        {name: spec},
        {name: {"file": onnx_file, "sha256": sha}},
        precision=precision,
        sm=sm,
        trt_version=trt,
        graphs=[name],
    )
    cache = engine.folder / timing_cache_name(trt, sm)

    def run(tmp: Path) -> None:
        trt_build.build_engine(
            plan, engine.folder / onnx_file, tmp / plan.engine_file, timing_cache=cache
        )

    return Stage(
        f"engine:{name}",
        {"plan_key": plan.cache_key},
        run,
        info={"engine": plan.engine_file},
    )
