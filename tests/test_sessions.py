"""Session backends: TensorRT's pure decisions (no TensorRT here) and the PyTorch reference session
against ONNX Runtime on a tiny engine folder."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from export.dims import graph_dims
from export.trt_plan import pin_batch
from runtime.folder.graphs import graph_specs
from runtime.folder.manifest import EngineFolderError, rebuild_hint
from runtime.folder.spec import numpy_dtype
from runtime.sessions import BACKENDS, open_session
from runtime.sessions.tensorrt import (
    POOL_ALIGN,
    ActivationPool,
    DeviceArray,
    TrtSession,
    buffer_plan,
    capturable,
    check_engine_compat,
    engine_io_errors,
    input_shapes,
    max_buffer_plan,
    pool_size,
)
from training.config import from_preset

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def specs():
    return graph_specs(graph_dims(from_preset("4b")))


# ---- TensorRT: pure helpers ----------------------------------------------------------------------
def test_buffer_plan_dit_step_at_profile_max_fp16(specs):
    plan = max_buffer_plan(specs["dit_step"], "fp16")
    assert plan["latents"] == ((4, 1792, 8, 8), np.dtype("float16"), 4 * 1792 * 64 * 2)
    assert plan["cond"] == ((4, 64, 2048), np.dtype("float16"), 4 * 64 * 2048 * 2)
    assert plan["next_latents"][0] == (4, 1792, 8, 8)
    assert plan["timestep"] == ((1,), np.dtype("int64"), 8)
    assert plan["c_velocity"] == ((1,), np.dtype("float32"), 4)  # declared float32, not graph float
    assert set(plan) == {*specs["dit_step"].input_names, *specs["dit_step"].output_names}


def test_buffer_plan_unet_step_pinned_is_exact(specs):
    spec = pin_batch(specs["unet_step"], 2)
    plan = max_buffer_plan(spec, "fp32")
    assert plan["latents"] == ((2, 4, 128, 128), np.dtype("float32"), 2 * 4 * 128 * 128 * 4)
    assert plan["negative"][0] == (1, 64, 1792)  # fixed batch 1, not pinned
    assert plan["next_latents"][0] == (2, 4, 128, 128)
    assert buffer_plan(spec, {"batch": 2}, "fp32") == plan


def test_buffer_plan_prefill_kv_at_max_and_at_given_sizes(specs):
    spec = specs["prefill"]
    plan = max_buffer_plan(spec, "bf16")
    bf16 = numpy_dtype("float", "bf16")
    assert plan["present_keys"] == ((36, 4, 2, 2048, 128), bf16, 36 * 4 * 2 * 2048 * 128 * 2)
    assert plan["logits"][0] == (4, 151668)
    assert plan["position_ids"] == ((3, 4, 2048), np.dtype("int64"), 3 * 4 * 2048 * 8)
    small = buffer_plan(spec, {"text_batch": 1, "seq": 10}, "fp16")
    assert small["hidden_states"] == ((1, 10, 2048), np.dtype("float16"), 10 * 2048 * 2)
    with pytest.raises(KeyError, match="seq"):
        buffer_plan(spec, {"text_batch": 1})


def test_capturable_only_when_every_dim_is_pinned(specs):
    for name in ("dit_step", "unet_step", "vae_decoder"):
        assert not capturable(specs[name])
        assert capturable(pin_batch(specs[name], 1))
    # prefill's seq stays dynamic whatever the batch: never captured
    assert not capturable(pin_batch(specs["prefill"], 1))


def test_pool_size_is_the_aligned_max():
    assert pool_size([]) == 0
    assert pool_size([POOL_ALIGN]) == POOL_ALIGN
    assert pool_size([1000, 300, 0]) == 1024
    assert pool_size([3 << 30, 1 << 30]) == 3 << 30
    with pytest.raises(ValueError, match=r"\[-1\]"):
        pool_size([10, -1])
    pool = ActivationPool()
    pool.sizes.update({1: 700, 2: 100})
    assert pool.ptr == 0 and pool_size(list(pool.sizes.values())) == 768


def _dit_shapes(batch=2, **over):
    shapes = {
        "latents": (batch, 1792, 8, 8),
        "prev_velocity": (batch, 1792, 8, 8),
        "timestep": (1,),
        "c_velocity": (1,),
        "c_prev": (1,),
        "cond": (batch, 64, 2048),
        "guidance": (1,),
    }
    return {**shapes, **over}


def test_input_shapes_accepts_the_profile_in_spec_order(specs):
    spec = specs["dit_step"]
    shapes = dict(reversed(list(_dit_shapes(3).items())))
    got = input_shapes(spec, shapes)
    assert list(got) == spec.input_names
    assert got["latents"] == (3, 1792, 8, 8)
    assert input_shapes(
        specs["prefill"], {"inputs_embeds": (2, 7, 2048), "position_ids": [3, 2, 7]}
    )


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (_dit_shapes(5), r"batch=5 is outside \[1, 4\]"),
        (_dit_shapes(2, cond=(3, 64, 2048)), "dim batch is 3 here but 2"),
        (_dit_shapes(2, latents=(2, 1000, 8, 8)), "latents: axis 1 is 1000, expected 1792"),
        (_dit_shapes(2, cond=(2, 64)), "cond: rank 2, expected 3"),
        (
            {k: v for k, v in _dit_shapes().items() if k != "guidance"},
            r"missing inputs \['guidance'\]",
        ),
        ({**_dit_shapes(), "mask": (1,)}, r"unexpected inputs \['mask'\]"),
    ],
)
def test_input_shapes_errors_name_the_input_and_the_range(specs, shapes, message):
    with pytest.raises(ValueError, match=message):
        input_shapes(specs["dit_step"], shapes)


def test_input_shapes_checks_prefill_sequence_range(specs):
    with pytest.raises(ValueError, match=r"seq=4096 is outside \[1, 2048\]"):
        input_shapes(
            specs["prefill"], {"inputs_embeds": (1, 4096, 2048), "position_ids": (3, 1, 4096)}
        )


MANIFEST = {
    "variant": "4b",
    "precision": "fp8",
    "backend": "tensorrt",
    "tensorrt": "10.8.0.43",
    "compute_capability": "9.0",
}
ENTRY = {"spec": {"name": "dit_step"}, "engine": {"file": "dit_step.fp8.trt10.8.0.sm90.plan"}}


def test_engine_compat_accepts_the_build_it_was_made_for():
    check_engine_compat(ENTRY, "10.8.0.43", (9, 0), MANIFEST)
    check_engine_compat(ENTRY, "10.8.0", (9, 0))
    unnamed = {"spec": {"name": "dit_step"}, "engine": {"file": "dit_step.plan"}}
    check_engine_compat(unnamed, "10.8.0.43", (9, 0), MANIFEST)  # from the manifest's fields


def test_engine_compat_names_the_tensorrt_version_and_the_rebuild_command():
    with pytest.raises(EngineFolderError) as err:
        check_engine_compat(ENTRY, "10.9.0.34", (9, 0), MANIFEST)
    text = str(err.value)
    assert "TensorRT version 10.8.0" in text and "TensorRT version 10.9.0.34" in text
    assert rebuild_hint(MANIFEST) in text and "--backend tensorrt" in text


def test_engine_compat_names_the_compute_capability():
    with pytest.raises(EngineFolderError) as err:
        check_engine_compat(ENTRY, "10.8.0.43", (8, 7), MANIFEST)
    text = str(err.value)
    assert "compute capability 9.0" in text and "compute capability 8.7" in text
    assert "dit_step" in text and rebuild_hint(MANIFEST) in text
    thor = {**ENTRY, "engine": {"file": "dit_step.fp8.trt10.8.0.sm110.plan"}}
    with pytest.raises(EngineFolderError, match=r"built for compute capability 11\.0"):
        check_engine_compat(thor, "10.8.0", (10, 0), MANIFEST)


def test_engine_compat_without_engine_or_record():
    with pytest.raises(EngineFolderError, match="no TensorRT engine.*--backend tensorrt"):
        check_engine_compat({"spec": {"name": "vision"}}, "10.8.0", (9, 0), MANIFEST)
    unknown = {"spec": {"name": "dit_step"}, "engine": {"file": "dit_step.plan"}}
    with pytest.raises(EngineFolderError, match="TensorRT version None"):
        check_engine_compat(unknown, "10.8.0", (9, 0), {"variant": "4b"})


def test_engine_io_errors(specs):
    spec = specs["dit_step"]
    io = {t.name: ("input", "HALF") for t in spec.inputs}
    io.update(timestep=("input", "INT64"), c_velocity=("input", "FLOAT"))
    io.update(c_prev=("input", "FLOAT"), guidance=("input", "FLOAT"))
    io["next_latents"] = io["velocity"] = ("output", "HALF")
    assert engine_io_errors(spec, "fp16", io) == []
    errors = engine_io_errors(spec, "fp32", io)
    assert "latents: engine dtype HALF, spec expects float32 at fp32" in errors
    del io["next_latents"]
    assert engine_io_errors(spec, "fp16", io) == [
        "engine outputs ['velocity'], spec outputs ['next_latents', 'velocity']"
    ]


def test_device_array_nbytes():
    assert DeviceArray(0, (2, 3), np.dtype("float16")).nbytes == 12


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed")
def test_trt_session_without_tensorrt_names_the_trt_extra(specs, tmp_path):
    spec = pin_batch(specs["dit_step"], 1)
    for open_ in (
        lambda: TrtSession(spec, tmp_path / "x.plan", precision="fp16"),
        lambda: open_session(spec, tmp_path / "x.plan", "tensorrt", device="cuda"),
    ):
        with pytest.raises(RuntimeError, match=r"`trt` extra.*blip3o-edge\[trt\]"):
            open_()


def test_trt_session_argument_errors_before_tensorrt(specs, tmp_path):
    with pytest.raises(ValueError, match=r"cuda_graph=True.*\['batch'\].*pin_batch"):
        TrtSession(specs["dit_step"], tmp_path / "x.plan", cuda_graph=True)
    with pytest.raises(ValueError, match="'cuda' or 'cuda:N', got 'cpu'"):
        TrtSession(specs["dit_step"], tmp_path / "x.plan", device="cpu")
    with pytest.raises(ValueError, match="unknown precision 'fp4'"):
        TrtSession(specs["dit_step"], tmp_path / "x.plan", precision="fp4")


# ---- PyTorch reference session vs ONNX Runtime ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from export.build_plan import BuildRequest, build

    out = tmp_path_factory.mktemp("tiny-fp32")
    graphs = ("dit_step", "vae_decoder", "decode")
    return build(BuildRequest(variant="tiny", out=out, graphs=graphs, progress=False))


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["dit_step", "vae_decoder", "decode"])
def test_torch_session_matches_onnxruntime(tiny_folder, graph):
    from export.torch_backend import TorchSession
    from runtime.folder.manifest import graph_spec, load_manifest
    from runtime.folder.spec import sample_inputs
    from runtime.sessions.onnxruntime import OrtSession

    manifest = load_manifest(tiny_folder)
    spec = graph_spec(manifest, graph)
    ort = OrtSession(spec, tiny_folder / manifest["graphs"][graph]["file"])
    ref = TorchSession(spec, tiny_folder)
    for batch in (1, 2):
        sizes = {"text_batch": batch, "capacity": 7} if graph == "decode" else {"batch": batch}
        feeds = sample_inputs(spec, sizes, seed=batch)  # decode: its per-layer cache inputs
        want, got = ort.run(feeds), ref.run(feeds)
        assert list(got) == spec.output_names
        for name in spec.output_names:
            host = ref.to_host(got[name])
            assert isinstance(host, np.ndarray) and host.dtype == np.float32
            np.testing.assert_allclose(host, want[name], atol=1e-4, rtol=0)
    ref.close()
    ort.close()


@pytest.mark.slow
def test_open_session_torch_shares_the_pipeline_and_keeps_outputs_on_device(tiny_folder):
    import torch

    from export import torch_backend
    from runtime.folder.manifest import graph_spec, load_manifest
    from runtime.folder.spec import sample_inputs

    spec = graph_spec(load_manifest(tiny_folder), "dit_step")
    session = open_session(spec, tiny_folder, backend="torch")
    assert isinstance(session, torch_backend.TorchSession)
    first = torch_backend.load_folder_pipeline(tiny_folder)
    assert torch_backend.load_folder_pipeline(tiny_folder, "cpu", "int8") is first  # fp32 compute
    feeds = sample_inputs(spec, {"batch": 1})
    out = session.run(feeds)["next_latents"]
    assert isinstance(out, torch.Tensor)
    again = session.run({**feeds, "latents": out})["next_latents"]  # a step loop, no host copy
    assert again.shape == out.shape and not torch.equal(again, out)


def test_unknown_backend_lists_the_valid_ones(specs, tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'jax'") as err:
        open_session(specs["dit_step"], tmp_path, backend="jax")
    assert all(name in str(err.value) for name in BACKENDS)
