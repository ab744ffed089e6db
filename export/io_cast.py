"""Float32 I/O around a 16-bit graph: what lets an INT8/FP8 TensorRT folder run its text and
vision graphs in fp16/bf16.

A quantized folder's graphs share one I/O dtype (float32: the runtime feeds every graph of a
folder alike, `runtime.folder.spec.io_dtype`), but its text decoder and vision tower are not
quantized (LLM quantization belongs to weight-only or SmoothQuant recipes) and kept at fp32 they
hold twice the weight memory of fp16: decisive for the 3B/7B decoder on an 8-16 GB Orin. So
they are exported at 16 bits and this pass puts a Cast at each float input and output: the
graph's interface is float32, its weights and compute 16-bit (norms, softmax and RoPE stay in
fp32 where the exporter put them). The casts cost one elementwise pass over the I/O; the KV
cache, which is I/O of prefill and decode, stays float32 on the device.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

T = onnx.TensorProto
SIXTEEN = {T.FLOAT16, T.BFLOAT16}


def cast_float_io(path: str | Path, to: int = T.FLOAT) -> list[str]:
    """Rewrite the graph at `path` in place so its 16-bit float inputs and outputs are `to`
    (float32), cast at the boundary; returns the names of the tensors changed. External data
    stays where it is (the graph is loaded without it)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    g, changed = model.graph, []
    initializers = {t.name for t in g.initializer}
    casts_in, casts_out = [], []
    for value in g.input:
        kind = value.type.tensor_type.elem_type
        if value.name in initializers or kind not in SIXTEEN:
            continue
        inner = f"{value.name}__{T.DataType.Name(kind).lower()}"
        for node in g.node:
            node.input[:] = [inner if i == value.name else i for i in node.input]
        casts_in.append(helper.make_node("Cast", [value.name], [inner], to=kind,
                                         name=f"io_cast_in/{value.name}"))  # fmt: skip
        value.type.tensor_type.elem_type = to
        changed.append(value.name)
    for value in g.output:
        kind = value.type.tensor_type.elem_type
        if kind not in SIXTEEN:
            continue
        inner = f"{value.name}__{T.DataType.Name(kind).lower()}"
        for node in g.node:
            node.output[:] = [inner if o == value.name else o for o in node.output]
            node.input[:] = [inner if i == value.name else i for i in node.input]
        casts_out.append(helper.make_node("Cast", [inner], [value.name], to=to,
                                          name=f"io_cast_out/{value.name}"))  # fmt: skip
        value.type.tensor_type.elem_type = to
        changed.append(value.name)
    kept = [v for v in g.value_info if v.name not in changed]  # their types changed
    del g.value_info[:]
    g.value_info.extend(kept)
    nodes = casts_in + list(g.node) + casts_out
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(model, str(path))
    return changed
