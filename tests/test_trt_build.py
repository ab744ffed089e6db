"""Build a real engine of a tiny `vae_decoder` (only where TensorRT and a GPU exist)."""

from __future__ import annotations

import hashlib

import pytest

tensorrt = pytest.importorskip("tensorrt")
torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.trt, pytest.mark.gpu]


def test_build_tiny_vae_decoder_engine(tiny_config, tmp_path):
    from export.dims import graph_dims
    from export.onnx_export import export_graph
    from export.trt_build import build_engine, compute_capability, tensorrt_version
    from export.trt_plan import plan_engines
    from export.wrappers.generation import VAEDecoderGraph
    from runtime.folder.graphs import graph_specs
    from training.model.decoder import Decoder

    sm = compute_capability()
    if sm is None:
        pytest.skip("no CUDA GPU")
    spec = graph_specs(graph_dims(tiny_config))["vae_decoder"]
    torch.manual_seed(0)
    onnx = export_graph(VAEDecoderGraph(Decoder(tiny_config.decoder)), spec, tmp_path / "vae.onnx")
    sha = hashlib.sha256(onnx.read_bytes()).hexdigest()
    (plan,) = plan_engines(
        {"vae_decoder": spec},
        {"vae_decoder": {"file": onnx.name, "sha256": sha}},
        precision="fp32",
        sm=sm,
        trt_version=tensorrt_version(),
        static_batch=1,
    )
    cache = tmp_path / "timing.cache"
    engine = build_engine(plan, onnx, tmp_path / plan.engine_file, timing_cache=cache)
    assert engine.name == plan.engine_file and cache.stat().st_size > 0

    runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
    loaded = runtime.deserialize_cuda_engine(engine.read_bytes())
    assert loaded is not None
    names = [loaded.get_tensor_name(i) for i in range(loaded.num_io_tensors)]
    assert names == ["latents", "images"]
    shapes = [tuple(s) for s in loaded.get_tensor_profile_shape("latents", 0)]
    assert shapes == list(plan.profiles[0]["latents"]) and len(set(shapes)) == 1  # pinned: static
