"""The generated Triton model repository: every config.pbtxt parses as tritonclient's
ModelConfig protobuf and agrees with the manifest; the orchestrator's BLS loop, run against a
fake `triton_python_backend_utils` that executes the graph models on ONNX Runtime, gives the
runtime's own image. Triton itself is not run here."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import types

import numpy as np
import pytest

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

from runtime.folder.manifest import graph_spec, read_manifest  # noqa: E402
from runtime.folder.spec import numpy_dtype  # noqa: E402
from runtime.params import GeneratorParams, field_info  # noqa: E402
from runtime.server.triton import GENERATION_GRAPHS, ORCHESTRATOR, write_repository  # noqa: E402

TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}


def parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repo(tiny_engine_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton")
    names = write_repository(tiny_engine_dir, out)
    assert names == [*GENERATION_GRAPHS, ORCHESTRATOR]
    return out


def test_every_config_parses_and_matches_the_manifest(repo, tiny_engine_dir):
    manifest = read_manifest(tiny_engine_dir)
    for name in GENERATION_GRAPHS:
        config = parse(repo / name / "config.pbtxt")
        spec = graph_spec(manifest, name)
        assert config.name == name and config.backend == "onnxruntime"
        assert config.max_batch_size == 0
        for got, want in ((config.input, spec.inputs), (config.output, spec.outputs)):
            assert [t.name for t in got] == [t.name for t in want]
            for g, w in zip(got, want):
                assert list(g.dims) == [d if isinstance(d, int) else -1 for d in w.shape]
                dtype = str(numpy_dtype(w.dtype, manifest["precision"]))
                assert model_config_pb2.DataType.Name(g.data_type) == TYPES[dtype]
        model = repo / name / "1" / "model.onnx"  # the folder's graph itself, byte for byte
        entry = manifest["graphs"][name]
        assert model.resolve() == (tiny_engine_dir / entry["file"]).resolve()
        assert hashlib.sha256(model.read_bytes()).hexdigest() == entry["sha256"]
    orchestrator = parse(repo / ORCHESTRATOR / "config.pbtxt")
    assert orchestrator.backend == "python"
    # PROMPT, and one optional input per GeneratorParams field, typed by the field
    kinds = {int: "TYPE_INT64", float: "TYPE_FP32", str: "TYPE_STRING"}
    want = [(n.upper(), kinds[i["kind"]]) for n, i in field_info(GeneratorParams).items()]
    got = [(t.name, model_config_pb2.DataType.Name(t.data_type)) for t in orchestrator.input]
    assert got == [*want, ("PROMPT", "TYPE_STRING")]
    assert all(t.optional for t in orchestrator.input[:-1])
    assert orchestrator.parameters["ENGINES"].string_value == str(tiny_engine_dir.resolve())
    assert (repo / ORCHESTRATOR / "1" / "model.py").is_file()


def test_refuses_a_non_empty_out(tiny_engine_dir, tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        write_repository(tiny_engine_dir, tmp_path)


def fake_pb_utils(sessions):
    """The slice of triton_python_backend_utils the orchestrator uses, over local sessions."""
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, np.asarray(array)

        def as_numpy(self):
            return self.array

    class Response:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self._error = output_tensors, error

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs):
            self.model, self.names, self.inputs = model_name, requested_output_names, inputs

        def exec(self):
            out = sessions[self.model].run({t.name: t.array for t in self.inputs})
            return Response([Tensor(n, out[n]) for n in self.names])

    class TritonError:
        def __init__(self, message):
            self._message = message

        def message(self):
            return self._message

    pb.Tensor, pb.InferenceRequest, pb.InferenceResponse = Tensor, InferenceRequest, Response
    pb.TritonError = TritonError
    pb.get_input_tensor_by_name = lambda r, n: next((t for t in r if t.name == n), None)
    pb.get_output_tensor_by_name = lambda r, n: next(t for t in r.output_tensors if t.name == n)
    return pb


def test_orchestrator_runs_the_runtime_loop_through_bls(repo, tiny_engine_dir, monkeypatch):
    from runtime.generator import Generator

    gen = Generator.from_dir(tiny_engine_dir)
    sessions = {name: gen.session(name) for name in GENERATION_GRAPHS}
    pb = fake_pb_utils(sessions)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location(
        "blip3o_model", repo / ORCHESTRATOR / "1" / "model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = parse(repo / ORCHESTRATOR / "config.pbtxt")
    params = {k: {"string_value": v.string_value} for k, v in config.parameters.items()}
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"parameters": params})})
    request = [
        pb.Tensor("PROMPT", np.array([b"a red circle"], dtype=object)),
        pb.Tensor("SEED", np.array([4])),
        pb.Tensor("STEPS", np.array([2])),
        pb.Tensor("DECODER_STEPS", np.array([3])),
    ]
    bad = [pb.Tensor("PROMPT", np.array([b"x"], dtype=object)), pb.Tensor("STEPS", np.array([0]))]
    good, refused = model.execute([request, bad])
    images = good.output_tensors[0].as_numpy()
    ref = gen.generate("a red circle", seed=4, steps=2, decoder_steps=3)[0]
    assert images.shape == (1, 64, 64, 3) and np.array_equal(images[0], np.asarray(ref))
    assert "steps must be in" in refused.error().message()
    model.finalize()
    gen.close()
