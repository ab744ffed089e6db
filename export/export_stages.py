"""The `export:<graph>` stage: one graph's wrapper over its loaded component, exported to ONNX.

At fp32 for fp32 folders and for INT8/FP8 ones (their Q/DQ graphs are made from the fp32
export), at fp16/bf16 for those precisions (`export.precision.onnx_precision`); the text and
vision graphs of an INT8/FP8 TensorRT folder at 16 bits (`onnx`), their float I/O cast to the
folder's float32 (`export.io_cast`). The key holds the checkpoint, the spec, the precision and
I/O dtype, the exporting tools, the opset and our exporter's source.
"""

from __future__ import annotations

from pathlib import Path

from export.build_folder import Stage, exporter_source_hash
from export.precision import onnx_precision
from export.wrappers import graph_module
from runtime.folder.spec import io_dtype, spec_to_dict


def export_stage(
    name: str, spec, source, precision: str, versions: dict, onnx: str | None = None
) -> Stage:
    """Graph `name` of a `precision` folder, exported at `onnx` (default: the folder's ONNX
    precision); float I/O is the folder's either way."""
    from export.onnx_export import OPSET, export_graph  # imports torch

    p = onnx or onnx_precision(precision)
    file, io = f"{name}.{p}.onnx", io_dtype(precision)

    def run(tmp: Path) -> dict:
        module = graph_module(name, source.for_graph(name, p))
        export_graph(module, spec, tmp / file, precision=p)
        if io_dtype(p) != io:
            from export.io_cast import cast_float_io  # imports onnx

            cast_float_io(tmp / file)
        return {}

    key = {
        "checkpoint": source.hash,
        "precision": p,
        "io": io,
        "spec": spec_to_dict(spec),
        "tools": {k: versions[k] for k in ("torch", "transformers", "diffusers", "onnxscript")},
        "opset": OPSET,
        "code": exporter_source_hash("export"),
    }
    return Stage(f"export:{name}", key, run, info={"onnx": file})
