"""The TensorRT engine plan of the 4b variant, checked as data (no TensorRT, no GPU)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys

import pytest

from export.dims import graph_dims
from export.trt_plan import (
    GPUS,
    cache_key,
    engine_file_name,
    plan_engines,
    plan_to_dict,
    resolve_precision,
    timing_cache_name,
)
from runtime.folder.graphs import GRAPHS, graph_specs
from runtime.folder.spec import PRECISIONS, trt_profile
from training.config import from_preset

H100, ORIN, A100, T4 = (9, 0), (8, 7), (8, 0), (7, 5)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def specs():
    return graph_specs(graph_dims(from_preset("4b")))


@pytest.fixture(scope="module")
def onnx_files(specs):
    return {g: {"file": f"{g}.onnx", "sha256": _sha(g)} for g in specs}


def _plans(specs, onnx_files, **kw):
    args = {"precision": "fp8", "sm": H100, "trt_version": "10.8.0", **kw}
    return {p.graph: p for p in plan_engines(specs, onnx_files, **args)}


def test_profiles_are_the_spec_profiles_at_4b_dims(specs, onnx_files):
    plans = _plans(specs, onnx_files)
    assert list(plans) == list(GRAPHS)
    for name, plan in plans.items():
        assert plan.profiles == (trt_profile(specs[name]),)
        assert plan.network_flags == ("STRONGLY_TYPED",)
        assert plan.builder_flags == ()  # precision comes from the ONNX, not builder flags
        assert plan.cleared_flags == ("TF32",)  # fp32 layers compute in fp32, not TF32
        assert plan.precision == "fp8" and plan.onnx_file == f"{name}.onnx"
    p = plans
    assert p["prefill"].profiles[0]["inputs_embeds"] == (
        (1, 1, 2048),
        (1, 128, 2048),
        (4, 2048, 2048),
    )
    assert p["prefill"].profiles[0]["position_ids"][2] == (3, 4, 2048)
    profile = p["decode"].profiles[0]  # one (B, KV, C, D) cache input per layer of the 36
    assert profile["cache_keys.0"][2] == profile["cache_values.35"][2] == (4, 2, 4096, 128)
    assert p["dit_step"].profiles[0]["latents"] == (
        (1, 1792, 8, 8),
        (1, 1792, 8, 8),
        (4, 1792, 8, 8),
    )
    assert p["dit_step"].profiles[0]["cond"][0] == (1, 64, 2048)
    assert p["dit"].profiles[0]["x"] == ((2, 1792, 8, 8), (2, 1792, 8, 8), (8, 1792, 8, 8))
    assert p["unet_step"].profiles[0]["latents"] == (
        (1, 4, 128, 128),
        (1, 4, 128, 128),
        (4, 4, 128, 128),
    )
    assert p["unet_step"].profiles[0]["negative"] == ((1, 64, 1792),) * 3
    assert p["vae_decoder"].profiles[0]["latents"][2] == (4, 4, 128, 128)
    assert specs["vae_decoder"].tensor("images").shape == ("batch", 3, 1024, 1024)
    # fp8 is a Q/DQ graph with float32 I/O; declared dtypes stay as they are
    assert p["dit_step"].input_dtypes == {
        "latents": "float32",
        "prev_velocity": "float32",
        "timestep": "int64",
        "c_velocity": "float32",
        "c_prev": "float32",
        "cond": "float32",
        "guidance": "float32",
    }
    fp16 = _plans(specs, onnx_files, precision="fp16")["dit_step"].input_dtypes
    assert fp16["latents"] == "float16" and fp16["c_velocity"] == "float32"


def test_engine_file_names_carry_precision_trt_version_and_sm(specs, onnx_files):
    assert engine_file_name("dit_step", "fp8", "10.8.0", H100) == "dit_step.fp8.trt10.8.0.sm90.plan"
    assert engine_file_name("vae_decoder", "int8", "10.3.0.30", ORIN) == (
        "vae_decoder.int8.trt10.3.0.30.sm87.plan"
    )
    assert engine_file_name("dit", "fp16", "10.8.0", (10, 0)) == "dit.fp16.trt10.8.0.sm100.plan"
    assert engine_file_name("dit_step", "fp8", "10.8.0", H100, 1) == (
        "dit_step.b1.fp8.trt10.8.0.sm90.plan"
    )
    for name, plan in _plans(specs, onnx_files).items():
        assert plan.engine_file == f"{name}.fp8.trt10.8.0.sm90.plan"
    assert timing_cache_name("10.8.0", ORIN) == "timing.trt10.8.0.sm87.cache"
    with pytest.raises(ValueError, match="'10.x'"):
        engine_file_name("dit", "fp16", "10.x", H100)
    with pytest.raises(ValueError, match="'int4'"):
        engine_file_name("dit", "int4", "10.8.0", H100)


def test_cache_key_changes_with_each_input_and_only_then(specs):
    profile = trt_profile(specs["dit_step"])
    base = {
        "onnx_sha256": _sha("a"),
        "precision": "fp8",
        "trt_version": "10.8.0",
        "sm": H100,
        "profiles": (profile,),
        "flags": ("STRONGLY_TYPED",),
    }
    key = cache_key(**base)
    assert len(key) == 64 and key == cache_key(**base)
    reordered = dict(reversed(list(profile.items())))
    same = {**base, "profiles": [{k: list(v) for k, v in reordered.items()}], "sm": [9, 0]}
    assert cache_key(**same) == key  # canonical JSON: order and container types don't matter
    pinned = {**profile, "latents": ((1, 1792, 8, 8),) * 3}
    changes = {
        "onnx_sha256": _sha("b"),
        "precision": "fp16",
        "trt_version": "10.9.0",
        "sm": (8, 9),
        "profiles": (pinned,),
        "flags": ("STRONGLY_TYPED", "SPARSE_WEIGHTS"),
    }
    keys = {field: cache_key(**{**base, field: value}) for field, value in changes.items()}
    assert key not in keys.values() and len(set(keys.values())) == len(changes)
    with pytest.raises(ValueError, match="onnx_sha256"):
        cache_key(**{**base, "onnx_sha256": "dit_step.onnx"})


def test_plan_cache_key_is_content_not_names(specs, onnx_files):
    plans = _plans(specs, onnx_files)
    dit = plans["dit_step"]
    assert dit.cache_key == cache_key(
        onnx_sha256=_sha("dit_step"),
        precision="fp8",
        trt_version="10.8.0",
        sm=H100,
        profiles=dit.profiles,
        flags=dit.flags,
    )
    assert dit.flags == ("STRONGLY_TYPED", "-TF32")  # TF32 cleared, and the key says so
    moved = {**onnx_files, "dit_step": {"file": "/elsewhere/x.onnx", "sha256": _sha("dit_step")}}
    assert _plans(specs, moved)["dit_step"].cache_key == dit.cache_key
    assert len({p.cache_key for p in plans.values()}) == len(plans)
    edited = {**onnx_files, "dit_step": {"file": "dit_step.onnx", "sha256": _sha("new")}}
    assert _plans(specs, edited)["dit_step"].cache_key != dit.cache_key
    assert _plans(specs, onnx_files, trt_version="10.9.0")["dit_step"].cache_key != dit.cache_key
    assert _plans(specs, onnx_files, sm=(8, 9))["dit_step"].cache_key != dit.cache_key


def test_auto_precision_across_gpus():
    expected = {
        (7, 2): "fp16",
        (7, 5): "fp16",
        (8, 0): "fp16",
        (8, 6): "fp16",
        (8, 7): "int8",
        (8, 9): "fp8",
        (9, 0): "fp8",
        (10, 0): "fp8",
        (12, 0): "fp8",  # not in the table: the SM thresholds still apply
    }
    assert {sm: resolve_precision("auto", sm) for sm in expected} == expected
    for sm, g in GPUS.items():
        assert g.fp8 == (sm >= (8, 9)) and g.bf16 == (sm >= (8, 0)) and g.int8
    assert GPUS[(8, 7)].family == "Ampere" and not GPUS[(8, 7)].fp8
    for precision in PRECISIONS:
        assert resolve_precision(precision, H100) == precision


@pytest.mark.parametrize(
    "precision, sm, words",
    [
        ("fp8", ORIN, ["SM 8.7", "Jetson Orin", "Ampere", "SM 8.9", "int8", "auto picks int8"]),
        ("fp8", A100, ["SM 8.0", "A100", "Ampere", "int8 or bf16 or fp16"]),
        ("bf16", T4, ["SM 7.5", "Turing", "SM 8.0", "use fp16"]),
    ],
)
def test_unsupported_precision_says_what_to_use(precision, sm, words):
    with pytest.raises(ValueError) as err:
        resolve_precision(precision, sm)
    for word in words:
        assert word in str(err.value)


def test_bad_requests_name_the_valid_values(specs, onnx_files):
    with pytest.raises(ValueError, match="'fp4'.*auto, fp32, fp16, bf16, fp8, int8"):
        resolve_precision("fp4", H100)
    with pytest.raises(ValueError, match="compute capability"):
        resolve_precision("auto", "sm90")
    with pytest.raises(ValueError, match=r"unknown graph\(s\) \['text'\]"):
        plan_engines(
            specs, onnx_files, precision="fp8", sm=H100, trt_version="10.8.0", graphs=["text"]
        )
    with pytest.raises(ValueError, match="SM 8.7"):
        plan_engines(specs, onnx_files, precision="fp8", sm=ORIN, trt_version="10.8.0")


def test_auto_plan_on_orin_is_int8(specs, onnx_files):
    plans = _plans(specs, onnx_files, precision="auto", sm=ORIN, graphs=["dit_step", "vae_decoder"])
    assert list(plans) == ["dit_step", "vae_decoder"]
    assert {p.precision for p in plans.values()} == {"int8"}
    assert plans["vae_decoder"].engine_file == "vae_decoder.int8.trt10.8.0.sm87.plan"


def test_static_batch_pins_batch_dims_for_cuda_graphs(specs, onnx_files):
    dynamic = _plans(specs, onnx_files)
    assert not dynamic["dit_step"].cuda_graph and dynamic["dit_step"].dynamic_dims == ("batch",)
    plans = _plans(specs, onnx_files, static_batch=1)
    for name in ("dit", "dit_step", "unet", "unet_step", "vae_decoder"):
        plan = plans[name]
        assert plan.cuda_graph and plan.dynamic_dims == () and plan.static_batch == 1
        for lo, opt, hi in plan.profiles[0].values():
            assert lo == opt == hi
        assert plan.engine_file == f"{name}.b1.fp8.trt10.8.0.sm90.plan"
        assert plan.cache_key != dynamic[name].cache_key
    assert plans["dit_step"].profiles[0]["latents"] == ((1, 1792, 8, 8),) * 3
    assert plans["dit"].profiles[0]["x"] == ((2, 1792, 8, 8),) * 3  # cfg_batch = 2 x batch
    assert (
        _plans(specs, onnx_files, static_batch=2)["unet_step"].profiles[0]["latents"]
        == ((2, 4, 128, 128),) * 3
    )
    # text graphs keep their dynamic sequence; vision has no batch dim at all
    assert (
        plans["prefill"].dynamic_dims == ("text_batch", "seq") and not plans["prefill"].cuda_graph
    )
    assert plans["vision"].static_batch is None and plans["vision"].engine_file.startswith(
        "vision.fp8"
    )
    with pytest.raises(
        ValueError, match=r"static_batch=5 puts cfg_batch=10 outside its range \[2, 8\]"
    ):
        _plans(specs, onnx_files, static_batch=5)


def test_plan_to_dict_is_json(specs, onnx_files):
    plan = _plans(specs, onnx_files, static_batch=1)["dit_step"]
    data = plan_to_dict(plan)
    assert json.loads(json.dumps(data)) == data
    assert data["profiles"][0]["latents"] == [[1, 1792, 8, 8]] * 3
    assert data["sm"] == [9, 0] and data["cache_key"] == plan.cache_key
    assert set(data) == {f.name for f in dataclasses.fields(plan)}


def test_plan_and_build_modules_import_without_torch_or_tensorrt():
    code = (
        "import sys, export.trt_plan, export.trt_build; "
        "bad = {'torch', 'tensorrt'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_without_tensorrt_names_the_extra(specs, onnx_files, tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from export.trt_build import build_engine, tensorrt_version

    assert tensorrt_version() is None
    plan = _plans(specs, onnx_files)["vae_decoder"]
    with pytest.raises(RuntimeError, match=r"`trt` extra"):
        build_engine(plan, tmp_path / "x.onnx", tmp_path / "x.plan", timing_cache=tmp_path / "t")


def test_compute_capability_from_nvidia_smi(tmp_path, monkeypatch):
    from export import trt_build
    from runtime.machine import probe

    assert probe.parse_compute_cap("8.7") == (8, 7)
    assert probe.parse_compute_cap("[N/A]") is None
    assert probe.parse_compute_cap("") is None
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, NVIDIA L4, 8.9, 22000, 23034, 550.54.15'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without torch
    monkeypatch.setattr(probe, "_libcuda", lambda: None)  # as on a machine without a driver
    assert trt_build.compute_capability() == (8, 9)
    assert trt_build.compute_capability(1) is None  # one GPU only
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert trt_build.compute_capability() is None


def test_static_batch_pins_the_generation_graphs_and_names_the_folder(specs):
    from export.build_plan import BuildError, BuildRequest, build, output_folder, pinned_specs
    from runtime.sessions.tensorrt import capturable

    pinned = pinned_specs(specs, 1)
    for name in ("dit_step", "unet_step", "vae_decoder", "dit", "unet"):
        assert capturable(pinned[name]) and not capturable(specs[name])
    assert pinned["dit"].dim("cfg_batch").max == 2 and pinned["dit_step"].dim("batch").min == 1
    for name in ("prefill", "decode", "vision"):
        assert pinned[name] == specs[name]  # their own dims stay dynamic
    with pytest.raises(
        BuildError,
        match=r"--static-batch 99: dit: static_batch=99 puts cfg_batch=198 outside its range",
    ):
        pinned_specs(specs, 99)
    request = BuildRequest(variant="4b", backend="tensorrt", static_batch=1)
    assert output_folder(request, "fp8").name == "4b-fp8-tensorrt-b1"
    with pytest.raises(BuildError, match="--static-batch .* needs --backend tensorrt"):
        build(BuildRequest(variant="tiny", static_batch=1, dry_run=True))
    with pytest.raises(BuildError, match="static_batch must be an integer >= 1, got 0"):
        build(BuildRequest(variant="tiny", backend="tensorrt", static_batch=0, dry_run=True))


def test_a_pinned_folder_takes_exactly_its_batch():
    from runtime.errors import UserError
    from runtime.params import GeneratorParams

    sampler = {"sampler": "euler", "steps": 30, "guidance": 3.0, "decoder_sampler": "euler",
               "decoder_steps": 50, "decoder_guidance": 3.0}  # fmt: skip
    assert GeneratorParams(num_images=2).resolved(sampler, 2, 2).num_images == 2
    with pytest.raises(UserError, match=r"num_images must be in \[2, 2\], got 1"):
        GeneratorParams().resolved(sampler, 2, 2)
