"""The `export:<graph>` stage: one graph's wrapper over its loaded component, exported to ONNX.

At fp32 for fp32 folders and for INT8/FP8 ones (their Q/DQ graphs are made from the fp32
export), at fp16/bf16 for those precisions (`export.precision.onnx_precision`). The key holds
the checkpoint, the spec, the exporting tools, the opset and our exporter's source.
"""

from __future__ import annotations

from pathlib import Path

from export.build_folder import Stage, exporter_source_hash
from export.precision import onnx_precision
from export.wrappers import graph_module
from runtime.folder.spec import spec_to_dict


def export_stage(name: str, spec, source, precision: str, versions: dict) -> Stage:
    from export.onnx_export import OPSET, export_graph  # imports torch

    p = onnx_precision(precision)
    file = f"{name}.{p}.onnx"

    def run(tmp: Path) -> dict:
        module = graph_module(name, source.for_graph(name, p))
        export_graph(module, spec, tmp / file, precision=p)
        return {}

    key = {
        "checkpoint": source.hash,
        "precision": p,
        "spec": spec_to_dict(spec),
        "tools": {k: versions[k] for k in ("torch", "transformers", "diffusers", "onnxscript")},
        "opset": OPSET,
        "code": exporter_source_hash("export"),
    }
    return Stage(f"export:{name}", key, run, info={"onnx": file})
