"""The TensorRT lint (`export.trt_lint`): each rule on a small graph that breaks it, the one-line
error, and the graphs we write: the tiny folder's fp32 graphs here (fast tier); fp16/bf16,
INT8/FP8 by each quantizer and 4b reduced-depth graphs where they are built (the build lints
every folder before its engine stages; `tests/test_quantize.py` lints every quantized graph)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from export import trt_lint
from runtime.folder.spec import Dim, GraphSpec, TensorSpec


def _model(nodes, inputs, outputs, inits=(), opset=20, domains=()):
    graph = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    imports = [h.make_opsetid("", opset), *(h.make_opsetid(d, 1) for d in domains)]
    return h.make_model(graph, opset_imports=imports)


def _vi(name, dtype=T.FLOAT, shape=(2, 4)):
    return h.make_tensor_value_info(name, dtype, list(shape))


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _rules(model, **kw):
    return sorted({f.rule for f in trt_lint.lint(model, name="g", **kw)})


def test_a_clean_graph_has_no_findings():
    nodes = [h.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = _model(
        nodes, [_vi("x")], [_vi("y", shape=(2, 2))], [_const("w", np.ones((4, 2), np.float32))]
    )
    assert trt_lint.lint(model) == []
    trt_lint.check(model)


@pytest.mark.parametrize(
    ("rule", "model"),
    [
        ("opset", lambda: _model([h.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")],
                                 opset=21)),
        ("opset", lambda: _model([h.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")],
                                 [_vi("x")], [_vi("y")], domains=["com.microsoft"])),
        ("op", lambda: _model([h.make_node("Unique", ["x"], ["y"])], [_vi("x")], [_vi("y")])),
        ("dtype", lambda: _model([h.make_node("MatMul", ["x", "x2"], ["y"])],
                                 [_vi("x", T.INT32), _vi("x2", T.INT32, (4, 2))],
                                 [_vi("y", T.INT32)])),
        ("constant", lambda: _model([h.make_node("ReduceMean", ["x", "axes"], ["y"])],
                                    [_vi("x"), _vi("axes", T.INT64, (1,))], [_vi("y")])),
        ("zero-point", lambda: _qdq(zero=3)),
        ("dq-input", lambda: _model(
            [h.make_node("DequantizeLinear", ["b", "s"], ["y"])], [], [_vi("y", shape=(4,))],
            [_const("b", np.ones(4, np.int32)), _const("s", np.float32(0.1))])),
        ("q-output", lambda: _qdq(zero_dtype=np.uint8)),
        ("resize", lambda: _model(
            [h.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic")],
            [_vi("x", shape=(1, 1, 2, 2))], [_vi("y", shape=(1, 1, 4, 4))],
            [_const("scales", np.array([1, 1, 2, 2], np.float32))])),
        ("layernorm", lambda: _model(
            [h.make_node("LayerNormalization", ["x", "g"], ["y", "mean"])], [_vi("x")],
            [_vi("y"), _vi("mean", shape=(2, 1))], [_const("g", np.ones(4, np.float32))])),
        ("shape-input", lambda: _model(
            [h.make_node("Add", ["n", "one"], ["m"]),
             h.make_node("Reshape", ["x", "m"], ["y"])],
            [_vi("x"), _vi("n", T.INT64, (2,))], [_vi("y")],
            [_const("one", np.ones(2, np.int64))])),
    ],
)  # fmt: skip
def test_each_rule_fires(rule, model):
    assert rule in _rules(model()), trt_lint.lint(model())


def _qdq(zero=0, zero_dtype=np.int8):
    nodes = [
        h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
        h.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq"),
    ]
    inits = [_const("s", np.float32(0.1)), _const("z", np.array(zero, zero_dtype))]
    return _model(nodes, [_vi("x")], [_vi("y")], inits)


def test_symmetric_int8_and_fp8_qdq_pass():
    assert trt_lint.lint(_qdq()) == []
    model = _qdq()
    fp8 = h.make_tensor("z", T.FLOAT8E4M3FN, [], [0])
    model.graph.initializer[1].CopyFrom(fp8)
    assert trt_lint.lint(model) == []


def test_inputs_and_their_dtypes_are_the_specs():
    spec = GraphSpec(
        "g",
        (TensorSpec("x", "float", (2, "n")), TensorSpec("ids", "int64", (2,))),
        (TensorSpec("y", "float", (2, "n")),),
        (Dim("n", 1, 4, 4),),
    )
    nodes = [h.make_node("Relu", ["x"], ["y"])]
    ok = _model(nodes, [_vi("x"), _vi("ids", T.INT64, (2,))], [_vi("y")])
    assert trt_lint.lint(ok, spec=spec) == []
    assert _rules(ok, spec=spec, precision="fp16") == ["input-dtype"]  # fp16 folders: fp16 I/O
    assert _rules(ok, spec=spec, precision="int8") == []  # Q/DQ folders keep float32 I/O
    missing = _model(nodes, [_vi("x")], [_vi("y")])
    assert _rules(missing, spec=spec) == ["inputs"]


def test_check_is_one_line_naming_graph_node_and_rule():
    with pytest.raises(trt_lint.TrtLintError) as err:
        trt_lint.check(_qdq(zero=3), name="dit_step")
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("TensorRT lint: dit_step: node q (QuantizeLinear): zero-point:")
    assert text.endswith("(and 1 more)")  # the DequantizeLinear shares the zero point


def test_the_tiny_folder_graphs_pass(tiny_engine_dir):
    assert trt_lint.lint_folder(tiny_engine_dir) == []
    assert trt_lint.main([str(tiny_engine_dir)]) == 0


def test_the_cli_exits_1_on_findings(tmp_path, capsys, tiny_engine_dir):
    import shutil

    folder = tmp_path / "f"
    shutil.copytree(tiny_engine_dir, folder)
    model = onnx.load(folder / "vae_decoder.fp32.onnx")
    model.opset_import[0].version = 21
    onnx.save(model, folder / "vae_decoder.fp32.onnx")
    assert trt_lint.main([str(folder), "--graphs", "vae_decoder"]) == 1
    assert "vae_decoder: model: opset: opset 21" in capsys.readouterr().out
