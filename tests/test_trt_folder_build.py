"""A TensorRT folder build over the simulated TensorRT (`tests/simulated_tensorrt.py`): the real
build plan, stages, lint and `export.trt_build`, with a GPU and TensorRT faked where the build
asks for them. INT8/FP8 TensorRT folders export their text and vision graphs at 16 bits behind
float32 I/O (`export.io_cast`), shown by `--dry-run`; every graph passes the TensorRT lint before
any engine stage runs, and a graph that does not stops the build in one line."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import export.trt_build as trt_build
from export import trt_lint
from export.build_plan import BuildRequest, build
from runtime.folder.manifest import graph_spec, load_manifest
from runtime.folder.spec import sample_inputs
from tests import simulated_device as sim

TEXT = ("vision", "prefill", "decode")


def _gpu(monkeypatch, sm):
    monkeypatch.setattr(trt_build, "compute_capability", lambda device=0: sm)
    monkeypatch.setattr(trt_build, "tensorrt_version", lambda: sim.TRT_VERSION)


@pytest.mark.parametrize(("sm", "want"), [((9, 0), "bf16"), ((8, 7), "bf16"), ((7, 5), "fp16")])
def test_dry_run_shows_16_bit_text_graphs_in_quantized_tensorrt_folders(
    monkeypatch, capsys, tmp_path, sm, want
):
    _gpu(monkeypatch, sm)
    precision = "int8"
    request = BuildRequest(variant="tiny", precision=precision, backend="tensorrt",
                           dry_run=True, out=tmp_path / "f", progress=False)  # fmt: skip
    build(request)
    out = capsys.readouterr().out
    assert f"export:prefill           will run               lm {want}" in out
    assert f"export:vision            will run               vision {want}" in out
    assert "export:dit_step          will run               dit fp32" in out  # Q/DQ source
    assert f"graphs compute in: vision {want}, prefill {want}, decode {want}, dit_step int8" in out
    assert "(float I/O: float32)" in out
    lines = out.splitlines()
    first_engine = next(i for i, line in enumerate(lines) if "engine:" in line)
    assert all("engine:" in line for line in lines[first_engine : first_engine + 6])
    # ONNX Runtime folders keep the fp32 text graphs (bf16 does not run on its CPU provider)
    build(BuildRequest(variant="tiny", precision=precision, dry_run=True, out=tmp_path / "o",
                       progress=False))  # fmt: skip
    assert "graphs compute in: vision fp32, prefill fp32" in capsys.readouterr().out


@pytest.mark.slow  # exports three tiny graphs (about a minute on one core)
def test_int8_tensorrt_folder_text_graphs_are_fp16_with_float32_io(
    monkeypatch, tmp_path, tiny_engine_dir
):
    _gpu(monkeypatch, (7, 5))  # a T4: INT8 and fp16, no bf16 (ONNX Runtime's CPU runs fp16)
    device = sim.install(monkeypatch)
    out = tmp_path / "tiny-int8-trt"
    request = BuildRequest(variant="tiny", precision="int8", backend="tensorrt", graphs=TEXT,
                           out=out, progress=False)  # fmt: skip

    # a graph the lint refuses stops the build in one line, before any engine stage
    real = trt_lint.lint

    def refuse_decode(model, **kw):
        found = real(model, **kw)
        if kw.get("name") == "decode":
            found.append(trt_lint.Finding("decode", "node x (Foo)", "op", "not supported"))
        return found

    monkeypatch.setattr(trt_lint, "lint", refuse_decode)
    with pytest.raises(trt_lint.TrtLintError, match=r"^TensorRT lint: decode: node x \(Foo\): op"):
        build(request)
    assert device.builds == [] and not list(out.glob("*.plan"))
    monkeypatch.setattr(trt_lint, "lint", real)

    folder = build(request)  # the exports are up to date; the engines are built now
    manifest = load_manifest(folder)
    assert len(device.builds) == 3
    assert all(6 not in b["flags"] for b in device.builds)  # BuilderFlag.TF32 cleared
    for name in TEXT:
        entry = manifest["graphs"][name]
        assert entry["precision"] == "fp16" and entry["file"] == f"{name}.fp16.onnx"
        model = onnx.load(folder / entry["file"], load_external_data=False)
        floats = {i.type.tensor_type.elem_type for i in model.graph.input if "ids" not in i.name}
        assert onnx.TensorProto.FLOAT16 not in floats  # float32 I/O, as the folder's
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
        assert trt_lint.lint_folder(folder, [name]) == []

    # the 16-bit prefill agrees with the fp32 one of the same checkpoint, at fp16 tolerance
    spec = graph_spec(manifest, "prefill")
    feeds = sample_inputs(spec, seed=0)
    ref = ort.InferenceSession(str(tiny_engine_dir / "prefill.fp32.onnx")).run(None, feeds)
    got = ort.InferenceSession(str(folder / "prefill.fp16.onnx")).run(None, feeds)
    assert all(g.dtype == np.float32 for g in got)
    np.testing.assert_allclose(got[0], ref[0], atol=0.05, rtol=0.05)

    # its engine opens as an int8 folder's (float32 I/O) and runs
    from runtime.sessions.tensorrt import TrtSession

    entry = manifest["graphs"]["prefill"]
    session = TrtSession(spec, folder / entry["engine"]["file"], precision="int8")
    logits = session.to_host(session.run(feeds)["logits"])
    np.testing.assert_allclose(logits, got[1], atol=1e-5)
    session.close()
