"""Our TensorRT and CUDA calls, checked against the real bindings of the versions we support.

The real `Generator` runs over the simulated device (`tests/simulated_device.py`) behind
recording proxies (`tests/api_recorder.py`): answers and images, low-memory release, CUDA-graph
capture and replay, the device KV cache, and `export.trt_build.build_engine` over the simulated
builder. Every call, property, enum member and constant it touched is then checked in a
subprocess (`tests/trt_probe.py`) against TensorRT's lean runtime bindings 10.3 and 11.4 (names,
argument counts and types from the docstring signatures, return types, enum values), the builder
bindings' library of the same versions (names), and cuda-python 12 and 13 (each call made for
real, which returns `cudaErrorInsufficientDriver` without a GPU: arity and argument types). The
simulation's own enum tables (dtype names such as `BF16`, `cudaError_t` codes) are checked too.
The wheels are installed by `python tests/trt_wheels.py` (CI does it before pytest); under
CI=true a missing one fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests import simulated_device as sim
from tests import simulated_tensorrt as simtrt
from tests import trt_wheels
from tests.api_recorder import Recorder
from tests.simulated_device import picture

pytestmark = pytest.mark.slow  # subprocesses over ~100 MB of real bindings
OK = "enum:cudaError_t.cudaSuccess"
FAST = dict(steps=2, decoder_steps=2)
SUITES = {  # (lean runtime, builder bindings, cuda-python): oldest and newest together
    "oldest": ("trt-lean-10.3", "trt-builder-10.3", "cuda-12"),
    "newest": ("trt-lean-11.4", "trt-builder-11.4", "cuda-13"),
}


def _target(name: str) -> Path:
    if trt_wheels.installed(name):
        return trt_wheels.target(name)
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is not installed under {trt_wheels.ROOT}: .ci/run installs it")
    try:
        return trt_wheels.install(name)
    except subprocess.CalledProcessError as err:
        pytest.skip(f"cannot install {name} ({err}); run: python tests/trt_wheels.py")


@pytest.fixture(scope="module")
def records(tiny_engine_dir, tmp_path_factory):
    """Every call our TensorRT code makes, recorded while it runs over the simulation."""
    recorder = Recorder()
    tmp = tmp_path_factory.mktemp("conformance")
    folder = sim.tensorrt_folder(tiny_engine_dir, tmp / "tiny-trt")
    with pytest.MonkeyPatch.context() as mp:
        _drive_generator(mp, recorder, folder)
    with pytest.MonkeyPatch.context() as mp:
        _drive_capture_and_cache(mp, recorder, folder)
    with pytest.MonkeyPatch.context() as mp:
        _drive_builder(mp, recorder, tiny_engine_dir, tmp)
    return sorted(recorder.records, key=repr)


def _drive_generator(mp, recorder, folder) -> None:
    from runtime.generator import Generator

    for low_memory in (False, True):
        sim.install(mp, wrap=recorder.wrap)
        with Generator.from_dir(folder, backend="tensorrt", low_memory=low_memory) as g:
            g.answer(picture(), "Describe the image.", max_new_tokens=3)
            g.generate("a red circle", **FAST)


def _drive_capture_and_cache(mp, recorder, folder) -> None:
    from runtime.folder.manifest import graph_spec, read_manifest
    from runtime.folder.spec import Dim, GraphSpec, sample_inputs
    from runtime.sessions.tensorrt import SharedDevice, TrtSession

    sim.install(mp, wrap=recorder.wrap)
    manifest = read_manifest(folder)
    spec = graph_spec(manifest, "vae_decoder")
    spec = GraphSpec(spec.name, spec.inputs, spec.outputs,
                     tuple(Dim(d.name, d.min, d.min, d.min) for d in spec.dims))  # fmt: skip
    shared = SharedDevice("cuda")
    vae = TrtSession(spec, folder / manifest["graphs"]["vae_decoder"]["engine"]["file"],
                     shared=shared)  # fmt: skip
    for seed in range(3):
        vae.to_host(vae.run(sample_inputs(spec, seed=seed))["images"])
    cache = vae.kv_cache((2, 1, 2, 5, 32), np.float16)  # padded layers: per-layer copies
    rows = np.ones((2, 1, 2, 2, 32), np.float16)
    cache.write(0, rows, rows)
    cache.to_host()
    vae.close()
    shared.close()


def _drive_builder(mp, recorder, tiny_engine_dir, tmp) -> None:
    from export.trt_build import build_engine
    from export.trt_plan import plan_engines
    from runtime.folder.manifest import graph_spec, read_manifest

    sim.install(mp, wrap=recorder.wrap)
    manifest = read_manifest(tiny_engine_dir)
    entry = manifest["graphs"]["vae_decoder"]
    (plan,) = plan_engines(
        {"vae_decoder": graph_spec(manifest, "vae_decoder")},
        {"vae_decoder": {"file": entry["file"], "sha256": entry["sha256"]}},
        precision="fp32", sm=sim.SM, trt_version=sim.TRT_VERSION,
    )  # fmt: skip
    cache = tmp / "timing.cache"
    for _ in range(2):  # the second build reuses the timing cache
        build_engine(plan, tiny_engine_dir / entry["file"], tmp / plan.engine_file,
                     timing_cache=cache)  # fmt: skip


def _enum_tables() -> dict:
    rt = sim._cuda_module(sim.Device())
    trt = {e.__name__: {m.name: int(m) for m in e}
           for e in (simtrt.DataType, simtrt.TensorIOMode, simtrt.TensorLocation,
                     simtrt.ExecutionContextAllocationStrategy, simtrt.Severity)}  # fmt: skip
    cuda = {e.__name__: {m.name: int(m) for m in e}
            for e in (rt.cudaMemcpyKind, rt.cudaStreamCaptureMode, sim.cudaError_t)}  # fmt: skip
    return {"trt": trt, "cuda": cuda}


def probe(records, lean=None, builder=None, cuda=None) -> dict:
    """Run `tests/trt_probe.py` over the real bindings of these targets; its answer."""
    paths = [str(_target(t)) for t in (lean, builder, cuda) if t and t != builder]
    request = dict(records=records, enums=_enum_tables(),
                   trt="tensorrt_lean_bindings" if lean else None, cuda=bool(cuda))  # fmt: skip
    if builder:
        _target(builder)
        request.update(builder_so=str(trt_wheels.builder_library(builder)),
                       builder_version=builder.rsplit("-", 1)[-1])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    script = Path(__file__).with_name("trt_probe.py")
    with tempfile.TemporaryDirectory() as tmp:
        answer = Path(tmp) / "answer.json"
        done = subprocess.run(
            [sys.executable, str(script), str(answer)], env=env, text=True,
            input=json.dumps(request), capture_output=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0 and answer.is_file(), done.stdout[-2000:] + done.stderr[-3000:]
        return json.loads(answer.read_text())


def test_recording_covers_the_session_and_the_builder(records):
    calls = {(r[1], r[2]) for r in records if r[0] == "call"}
    for call in [
        ("IExecutionContext", "execute_async_v3"), ("IExecutionContext", "set_tensor_address"),
        ("IExecutionContext", "set_input_shape"), ("IExecutionContext", "set_device_memory"),
        ("ICudaEngine", "get_tensor_location"), ("Runtime", "deserialize_cuda_engine"),
        ("cuda", "cudaMemcpy2DAsync"), ("cuda", "cudaGraphLaunch"), ("cuda", "cudaGetDevice"),
        ("cuda", "cudaStreamBeginCapture"), ("Builder", "build_serialized_network"),
        ("IBuilderConfig", "clear_flag"), ("OnnxParser", "parse_from_file"),
    ]:  # fmt: skip
        assert call in calls, call
    assert ("enum", "BuilderFlag", "TF32", int(simtrt.BuilderFlag.TF32)) in records
    assert ("attr", "Logger", "WARNING") in records


@pytest.mark.parametrize("suite", list(SUITES))
def test_our_calls_exist_in_the_real_bindings(records, suite):
    lean, builder, cuda = SUITES[suite]
    answer = probe(records, lean=lean, builder=builder, cuda=cuda)
    assert answer["problems"] == [], "\n".join(answer["problems"])
    assert answer["checked"] >= len(records) * 2 // 3, answer  # most records were checked
    want = {"oldest": ("10.3", "12."), "newest": ("11.4", "13.")}[suite]
    assert answer["versions"]["trt"].startswith(want[0])
    assert answer["versions"]["cuda"].startswith(want[1])


def test_the_probe_catches_what_the_real_api_lacks(records):
    """The checks bite: names, argument kinds, arity and enum values that are not the real
    ones are each reported (so a green run means something)."""
    wrong = [
        ("call", "IExecutionContext", "execute_async_v3", ("cudaStream_t",), (), "bool"),
        ("call", "IExecutionContext", "set_tensor_address", ("str", "int"), (), "None"),
        ("call", "ICudaEngine", "get_binding_index", ("str",), (), "int"),
        ("enum", "DataType", "BFLOAT16", 7),
        ("enum", "TensorIOMode", "OUTPUT", 3),
        ("property", "ICudaEngine", "device_memory_size_v3"),
        ("attr", "Logger", "WARN"),
        ("call", "cuda", "cudaMalloc", ("int", "int"), (), f"tuple:{OK},int"),
        ("call", "cuda", "cudaFree", ("int",), (), f"tuple:{OK},int"),
        ("call", "IBuilderConfig", "clear_flags", ("enum:BuilderFlag.TF32",), (), "None"),
    ]  # fmt: skip
    answer = probe(wrong, *SUITES["newest"])
    assert len(answer["problems"]) == len(wrong), "\n".join(answer["problems"])
