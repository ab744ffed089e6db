"""Build cache keys that hold: backend in the quantize key and the folder name, a keyed TensorRT
timing cache, and an exporter hash over exactly the sources that make graphs.

Each test fails on the old behaviour: a TensorRT build reused an ONNX Runtime Q/DQ graph (same
key, same `engines/<variant>-<precision>` folder), every engine shared `timing.cache`, and the
exporter hash covered all of `export/` (editing check.py re-exported everything) but not
`training/checkpoint.py`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import export.build_folder as build_folder
from export.build_folder import REPO, BuildFolder
from export.build_plan import BuildError, BuildRequest, output_folder
from export.dims import graph_dims
from export.stage_factory import StageFactory
from runtime.folder.graphs import graph_specs
from runtime.folder.manifest import atomic_write_json

SHA = "ab" * 32
VERSIONS = {"nvidia-modelopt": "0.47", "onnxruntime": "1.32", "onnx": "1.23"}


def _factory(tiny_config, backend: str, precision="fp8", trt=None, sm=None):
    request = BuildRequest(variant="tiny", precision=precision, backend=backend)
    source = SimpleNamespace(config=tiny_config, hash="c" * 64)
    specs = graph_specs(graph_dims(tiny_config))
    return StageFactory(request, source, precision, specs, VERSIONS, sm, trt, ("dit_step",))


def _engine(tmp_path) -> BuildFolder:
    record = {"key": "k", "onnx": "dit_step.fp32.onnx", "files": [{"file": "dit_step.fp32.onnx",
              "sha256": SHA}]}  # fmt: skip
    return BuildFolder(tmp_path, {"stages": {"export:dit_step": record}})


def test_quantize_key_includes_the_high_precision_dtype(tiny_config, tmp_path):
    engine = _engine(tmp_path)
    ort = _factory(tiny_config, "onnxruntime").quantize("dit_step", engine)
    trt = _factory(tiny_config, "tensorrt", trt="10.8.0", sm=(9, 0)).quantize("dit_step", engine)
    assert ort.key_data["high_precision"] == "fp32" and trt.key_data["high_precision"] == "fp16"
    assert ort.key != trt.key


def test_folder_name_includes_a_non_default_backend():
    trt = output_folder(BuildRequest(variant="4b", backend="tensorrt"), "fp8")
    ort = output_folder(BuildRequest(variant="4b"), "fp8")
    assert (trt.name, ort.name) == ("4b-fp8-tensorrt", "4b-fp8")
    assert output_folder(BuildRequest(variant="4b"), "fp32", "4b-L2").name == "4b-L2-fp32"


def test_a_folder_of_another_backend_is_refused(tmp_path):
    from export.build_folder import tool_versions
    from export.build_plan import _start_manifest
    from export.source import ModelSource

    request = BuildRequest(variant="tiny", precision="fp8", random_weights=True, out=tmp_path)
    source = ModelSource(request, "fp8")
    manifest = _start_manifest(tmp_path, request, "fp8", source, None, None, tool_versions())
    atomic_write_json(tmp_path / "manifest.json", manifest)  # what an ONNX Runtime build writes
    assert output_folder(BuildRequest(variant="tiny", out=tmp_path), "fp8") == tmp_path
    with pytest.raises(BuildError, match=r"for onnxruntime; choose another --out.*\(tensorrt\)"):
        output_folder(BuildRequest(variant="tiny", backend="tensorrt", out=tmp_path), "fp8")


def test_the_timing_cache_is_keyed_on_tensorrt_and_gpu(tiny_config, tmp_path, monkeypatch):
    import export.trt_build as trt_build

    used = []

    def build_engine(plan, onnx, out, *, timing_cache):
        used.append(timing_cache)

    monkeypatch.setattr(trt_build, "build_engine", build_engine)
    factory = _factory(tiny_config, "tensorrt", precision="fp16", trt="10.8.0", sm=(8, 9))
    factory.engine_stage("dit_step", _engine(tmp_path)).run(tmp_path)
    assert used == [tmp_path / "timing.trt10.8.0.sm89.cache"]


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """Our Python sources copied to a scratch repository that the hash reads instead."""
    for top in ("export", "training", "runtime"):
        shutil.copytree(REPO / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(build_folder, "REPO", tmp_path)
    return tmp_path


def _edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n# edited\n")


@pytest.mark.parametrize("kind", ["assets", "export", "quantize"])
def test_source_hash_covers_what_makes_the_outputs(repo_copy, kind):
    before = build_folder.exporter_source_hash(kind)
    for unrelated in ("export/check.py", "export/build_plan.py", "export/trt_build.py"):
        _edit(repo_copy / unrelated)
    assert build_folder.exporter_source_hash(kind) == before
    _edit(repo_copy / "training" / "checkpoint.py")
    assert build_folder.exporter_source_hash(kind) != before


def test_graph_code_rebuilds_graphs_not_assets(repo_copy):
    source_hash = build_folder.exporter_source_hash
    assets, export = source_hash("assets"), source_hash("export")
    _edit(repo_copy / "export" / "wrappers" / "generation.py")
    assert source_hash("export") != export
    assert source_hash("assets") == assets
    with pytest.raises(ValueError, match=r"unknown stage kind 'engine'; valid: assets, export"):
        source_hash("engine")
