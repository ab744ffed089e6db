"""A TensorRT lint of an exported ONNX graph: what the parser of every TensorRT we support takes.

    python export/trt_lint.py engines/tiny-int8            # every graph of a folder

The build runs it on every graph before any engine stage (a failure is one line naming graph,
node and rule), and CI runs it on every graph we write (fp32/fp16/bf16 exports, INT8/FP8 by each
quantizer path, 4b reduced-depth graphs). Rules (`RULES`), from onnx-tensorrt's operator table
(`export.trt_onnx_ops`) and TensorRT's Q/DQ and I/O rules:

- `opset`: the default domain's opset is within the parser's range; no other domain is used;
- `op`: every operator is one the parser supports; `dtype`: in a type it supports;
- `constant`: inputs the parser needs at build time (`axes`, Q/DQ scales, zero points) are
  initializers or Constant outputs;
- `zero-point`: Q/DQ zero points are 0 (TensorRT quantization is symmetric);
- `dq-input`: DequantizeLinear reads INT8, FP8 or INT4 (an INT32 bias DQ is not parsed);
- `q-output`: QuantizeLinear writes INT8, FP8 or INT4 (not UINT8);
- `resize`, `layernorm`: the modes and outputs the parser takes;
- `shape-input`: no graph input is used as a shape (TensorRT would make it a host shape tensor,
  which our sessions never bind);
- `input-dtype`, `inputs`: the graph's inputs are the spec's, in the spec's dtypes at the
  folder's precision.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from export.errors import BuildError  # noqa: E402
from export.trt_onnx_ops import OPSET_RANGE, SUPPORTED  # noqa: E402
from runtime.folder.spec import GraphSpec, numpy_dtype  # noqa: E402

RULES = ("opset", "op", "dtype", "constant", "zero-point", "dq-input", "q-output", "resize",
         "layernorm", "shape-input", "input-dtype", "inputs")  # fmt: skip
T = onnx.TensorProto
TRT_TYPES = {T.FLOAT: "FP32", T.FLOAT16: "FP16", T.BFLOAT16: "BF16", T.INT32: "INT32",
             T.INT64: "INT64", T.INT8: "INT8", T.UINT8: "UINT8", T.BOOL: "BOOL",
             T.FLOAT8E4M3FN: "FP8", T.INT4: "INT4", T.DOUBLE: "FP32"}  # fmt: skip
QUANTIZED = {"INT8", "FP8", "INT4"}
# inputs the parser must know at build time: op -> input indices (opset >= 13 forms)
CONSTANT_INPUTS = {
    **dict.fromkeys(("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd"), (1,)),
    **dict.fromkeys(("Squeeze", "Unsqueeze", "CumSum"), (1,)),
    "Slice": (3,), "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2),
}  # fmt: skip
# inputs that are shapes: op -> input indices (a graph input reaching one is a shape tensor)
SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Tile": (1,),
                "Range": (0, 1, 2), "Slice": (1, 2, 4), "Resize": (3,), "TopK": (1,),
                "Pad": (1,), "OneHot": (1,)}  # fmt: skip
# integer arithmetic a shape may be computed with on its way from an input
SHAPE_PASSES = {"Cast", "Concat", "Squeeze", "Unsqueeze", "Gather", "Slice", "Add", "Sub", "Mul",
                "Div", "Max", "Min", "Reshape", "Identity", "Neg", "Floor", "Ceil"}  # fmt: skip
DATA_INPUT = {"Where": 1}  # the input whose type is the op's type (default: 0)
RESIZE_MODES = {
    "mode": {"nearest", "linear"},
    "coordinate_transformation_mode": {
        "half_pixel",
        "pytorch_half_pixel",
        "tf_half_pixel_for_nn",
        "asymmetric",
        "align_corners",
    },
}


@dataclass(frozen=True)
class Finding:
    graph: str
    node: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.graph}: {self.node}: {self.rule}: {self.message}"


class TrtLintError(BuildError):
    """A graph TensorRT's parser would refuse: the first finding, and how many more (a user
    error of the build: one line, exit status 2)."""


def lint(
    model: onnx.ModelProto | str | Path,
    *,
    name: str | None = None,
    spec: GraphSpec | None = None,
    precision: str | None = None,
) -> list[Finding]:
    """Every finding for one graph (empty when TensorRT's parser takes it)."""
    if not isinstance(model, onnx.ModelProto):
        name = name or Path(model).name
        model = onnx.load(str(model), load_external_data=False)
    name = name or model.graph.name
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - types from what the graph declares, then
        pass
    g, found = model.graph, []

    def add(node: str, rule: str, message: str) -> None:
        found.append(Finding(name, node, rule, message))

    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and not OPSET_RANGE[0] <= op.version <= OPSET_RANGE[1]:
            add("model", "opset", f"opset {op.version}; TensorRT 10.3-11.x parse {OPSET_RANGE}")
    types = {i.name: i.type.tensor_type.elem_type for i in [*g.input, *g.value_info, *g.output]}
    consts = {t.name: t for t in g.initializer}
    for node in g.node:
        if node.op_type == "Constant" and node.attribute:
            a = node.attribute[0]
            if a.name == "value":
                consts[node.output[0]] = a.t
    types.update({n: t.data_type for n, t in consts.items()})
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}

    for node in g.node:
        where = f"node {node.name or node.output[0]} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            add(where, "opset", f"domain {node.domain!r}: TensorRT parses the default domain only")
            continue
        if node.op_type not in SUPPORTED:
            add(where, "op", "not supported by TensorRT's ONNX parser")
            continue
        data = node.input[DATA_INPUT.get(node.op_type, 0)] if node.input else ""
        kind = TRT_TYPES.get(types.get(data, 0))
        if kind and kind not in SUPPORTED[node.op_type] and node.op_type != "DequantizeLinear":
            add(where, "dtype", f"input {data!r} is {kind}; TensorRT takes "
                f"{', '.join(sorted(SUPPORTED[node.op_type]))}")  # fmt: skip
        for i in CONSTANT_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] and node.input[i] not in consts:
                add(where, "constant", f"input {i} ({node.input[i]!r}) must be a constant")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            _qdq(node, where, kind, consts, types, add)
        elif node.op_type == "Resize":
            for attr in node.attribute:
                allowed = RESIZE_MODES.get(attr.name)
                if allowed and attr.s.decode() not in allowed:
                    add(where, "resize", f"{attr.name}={attr.s.decode()!r}; takes {allowed}")
        elif node.op_type == "LayerNormalization":
            if any(o in used for o in node.output[1:]):
                add(where, "layernorm", "only the first output (Y) is supported")
    _shape_inputs(g, add)
    if spec is not None:
        _spec_inputs(g, spec, precision or "fp32", types, add)
    return found


def _qdq(node, where, kind, consts, types, add) -> None:
    zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zero in consts and np.any(numpy_helper.to_array(consts[zero]).astype(np.float32) != 0):
        add(where, "zero-point", f"zero point {zero!r} is not 0 (TensorRT: symmetric only)")
    if node.op_type == "DequantizeLinear" and kind and kind not in QUANTIZED:
        add(where, "dq-input", f"dequantizes {kind}; TensorRT takes INT8, FP8, INT4")
    if node.op_type == "QuantizeLinear":
        out = TRT_TYPES.get(types.get(zero, 0)) if zero else "INT8"
        if out and out not in QUANTIZED:
            add(where, "q-output", f"quantizes to {out}; TensorRT takes INT8, FP8, INT4")


def _shape_inputs(g, add) -> None:
    """Graph inputs that reach a shape slot through integer arithmetic (not through Shape)."""
    producer = {o: n for n in g.node for o in n.output}
    inputs = {i.name for i in g.input} - {t.name for t in g.initializer}
    for node in g.node:
        for i in SHAPE_INPUTS.get(node.op_type, ()):
            if i >= len(node.input) or not node.input[i]:
                continue
            stack, seen = [node.input[i]], set()
            while stack:
                tensor = stack.pop()
                if tensor in seen:
                    continue
                seen.add(tensor)
                if tensor in inputs:
                    where = f"node {node.name or node.output[0]} ({node.op_type})"
                    message = f"graph input {tensor!r} is used as a shape (a host shape tensor)"
                    add(where, "shape-input", message)
                    continue
                src = producer.get(tensor)
                if src is not None and src.op_type in SHAPE_PASSES:
                    stack.extend(x for x in src.input if x)


def _spec_inputs(g, spec: GraphSpec, precision: str, types, add) -> None:
    names = [i.name for i in g.input if i.name not in {t.name for t in g.initializer}]
    if names != spec.input_names:
        add("inputs", "inputs", f"graph inputs {names}, spec {spec.input_names}")
    for t in spec.inputs:
        if t.name not in names:
            continue
        want = onnx.helper.np_dtype_to_tensor_dtype(numpy_dtype(t.dtype, precision))
        have = types.get(t.name)
        if have != want:
            got, need = T.DataType.Name(have or 0), T.DataType.Name(want)
            add(f"input {t.name}", "input-dtype", f"{got}; the spec wants {need} at {precision}")


def check(model, *, name=None, spec=None, precision=None) -> None:
    """Raise `TrtLintError` (one line: graph, node, rule, and how many more) on any finding."""
    found = lint(model, name=name, spec=spec, precision=precision)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise TrtLintError(f"TensorRT lint: {found[0]}{more}")


def lint_folder(folder: Path, graphs: list[str] | None = None) -> list[Finding]:
    """Every finding for the graphs of an engine folder, against the specs of its manifest."""
    from runtime.folder.manifest import graph_spec, load_manifest

    manifest = load_manifest(folder)
    found = []
    for name in graphs or list(manifest["graphs"]):
        entry, spec = manifest["graphs"][name], graph_spec(manifest, name)
        precision = manifest["precision"]  # the folder's I/O, whatever a graph computes in
        found += lint(folder / entry["file"], name=name, spec=spec, precision=precision)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python export/trt_lint.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("engines", type=Path, help="engine folder")
    parser.add_argument("--graphs", nargs="+", help="only these graphs")
    args = parser.parse_args(argv)
    found = lint_folder(args.engines, args.graphs)
    for finding in found:
        print(finding)
    print(f"{len(found)} finding(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
