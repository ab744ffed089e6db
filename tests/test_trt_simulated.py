"""The TensorRT session's control flow on a simulated device (`tests/simulated_device.py`): runs,
CUDA-graph capture and replay, release in low-memory mode, interleaved jobs, the in-place KV
cache, against the onnxruntime backend on the same graphs. The simulation raises on any use of
freed or unknown device memory, and its engines compute for real (ONNX Runtime underneath)."""

import numpy as np
import pytest

from runtime.folder.manifest import graph_spec, read_manifest
from runtime.folder.spec import Dim, GraphSpec, sample_inputs
from runtime.generator import Generator
from tests import simulated_device as sim
from tests.simulated_device import picture

FAST = dict(steps=2, decoder_steps=2)
QUESTION = "Describe the image."


@pytest.fixture(scope="module")
def trt_folder(tiny_engine_dir, tmp_path_factory):
    return sim.tensorrt_folder(tiny_engine_dir, tmp_path_factory.mktemp("sim") / "tiny-trt")


@pytest.fixture(scope="module")
def expected(tiny_engine_dir):
    """What the onnxruntime backend gives: two answers and one image."""
    with Generator.from_dir(tiny_engine_dir, verify=False) as g:
        answers = [
            g.answer(picture(), QUESTION, max_new_tokens=6),
            g.answer(picture((220, 40, 40), 80), "How many?", max_new_tokens=6),
        ]
        image = np.asarray(g.generate("a red circle", **FAST)[0])
    return answers, image


@pytest.fixture
def device(monkeypatch):
    return sim.install(monkeypatch)


@pytest.mark.parametrize("low_memory", [False, True])
def test_generator_on_simulated_tensorrt_equals_onnxruntime(
    trt_folder, expected, device, low_memory
):
    answers, image = expected
    with Generator.from_dir(trt_folder, backend="tensorrt", low_memory=low_memory) as g:
        assert g.device == "cuda"
        assert g.answer(picture(), QUESTION, max_new_tokens=6) == answers[0]
        assert np.array_equal(np.asarray(g.generate("a red circle", **FAST)[0]), image)
        if low_memory:
            assert g._sessions == {}  # released stage by stage, then all
        else:
            streams = {int(s.stream) for s in g._sessions.values()}
            pools = {id(s._pool) for s in g._sessions.values()}
            assert len(streams) == 1 and len(pools) == 1  # one stream, one activation pool
            sizes = [s._engine.device_memory_size_v2 for s in g._sessions.values()]
            assert g._backend.shared.pool.nbytes >= max(sizes)
    assert device.streams == set()  # the shared stream went with the Generator
    assert device.executions > 0


@pytest.mark.parametrize("low_memory", [False, True])
def test_interleaved_jobs_on_simulated_tensorrt(trt_folder, expected, device, low_memory):
    """Two token jobs and a generation stepped round-robin on the same sessions: outputs are
    owned copies and caches belong to their jobs, so each equals its run alone."""
    answers, image = expected
    with Generator.from_dir(trt_folder, backend="tensorrt", low_memory=low_memory) as g:
        jobs = [
            g.start_answer(picture(), QUESTION, max_new_tokens=6),
            g.start_answer(picture((220, 40, 40), 80), "How many?", max_new_tokens=6),
        ]
        drawing = g.start("a red circle", **FAST)
        while not all(j.done for j in jobs) or not drawing.done:
            for j in jobs:
                if not j.done:
                    j.generate_next_token()
            if not drawing.done:
                drawing.step()
        assert [j.text() for j in jobs] == answers
        assert np.array_equal(np.asarray(drawing.result()[0]), image)
        if not low_memory:  # the KV caches lived on the device
            decode = g._sessions["decode"]
            assert decode.kv_cache((1, 1, 1, 4, 2), np.float32).keys.owner is not None


def test_outputs_aliasing_session_buffers_fail_on_the_simulation(trt_folder, device, monkeypatch):
    """The defect the owned copies fix, reproduced: with outputs pointing into the session's
    buffers, low-memory release frees the UNet's latents before the VAE reads them."""
    from runtime.sessions import tensorrt as trt_session

    def alias(self, name, shape):
        return trt_session.DeviceArray(self._buffers[name], shape, self._plan[name][1], self.stream)

    monkeypatch.setattr(trt_session.TrtSession, "_copy_out", alias)
    with Generator.from_dir(trt_folder, backend="tensorrt", low_memory=True) as g:
        with pytest.raises(sim.SimulatedDeviceError, match="use after free"):
            g.generate("a red circle", **FAST)


def static_spec(spec: GraphSpec) -> GraphSpec:
    """The spec with every dim pinned at its minimum (what `pin_batch` builds)."""
    return GraphSpec(
        spec.name,
        spec.inputs,
        spec.outputs,
        tuple(Dim(d.name, d.min, d.min, d.min) for d in spec.dims),
    )


def test_capture_replays_with_fixed_addresses(trt_folder, tiny_engine_dir, device):
    """A static spec is captured on its first run and replayed after; device-array feeds are
    copied into the captured input buffers (not bound), so each replay reads its own feed."""
    import onnxruntime as ort

    from runtime.sessions.tensorrt import SharedDevice, TrtSession

    manifest = read_manifest(trt_folder)
    spec = static_spec(graph_spec(manifest, "vae_decoder"))
    shared = SharedDevice("cuda")
    vae = TrtSession(
        spec, trt_folder / manifest["graphs"]["vae_decoder"]["engine"]["file"], shared=shared
    )
    reference = ort.InferenceSession(
        str(tiny_engine_dir / manifest["graphs"]["vae_decoder"]["file"])
    )
    feeds = [sample_inputs(spec, seed=i) for i in range(3)]
    outs = []
    for i, f in enumerate(feeds):
        value = f["latents"]
        if i == 2:  # a device array, copied into the captured input buffer
            value = _device_copy(shared, value)
        outs.append(vae.to_host(vae.run({"latents": value})["images"]))
    assert device.replays >= 2  # runs after the first replay the captured graph
    for f, got in zip(feeds, outs):
        want = reference.run(None, f)[0]
        np.testing.assert_allclose(got, want, atol=1e-5)
    vae.close()
    shared.close()
    with pytest.raises(RuntimeError, match="closed"):
        vae.run(feeds[0])


def _device_copy(shared, host: np.ndarray):
    """A host array uploaded into a fresh owned device buffer."""
    from runtime.sessions.tensorrt import DeviceArray, DeviceBuffer, _imports

    rt = _imports()[1]
    buf = DeviceBuffer(rt, host.nbytes)
    kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    rt.cudaMemcpyAsync(buf.ptr, host.ctypes.data, host.nbytes, kind, shared.stream)
    return DeviceArray(buf.ptr, host.shape, host.dtype, shared.stream, buf)


def test_device_kv_cache_writes_rows_in_place(device):
    from runtime.sessions.tensorrt import DeviceKVCache, SharedDevice, _imports

    shared = SharedDevice()
    rt = _imports()[1]
    cache = DeviceKVCache(rt, shared.stream, (2, 1, 3, 6, 4), np.float32)
    want = np.zeros((2, 1, 3, 6, 4), np.float32)
    rng = np.random.default_rng(0)
    prefix = rng.standard_normal((2, 1, 3, 2, 4)).astype(np.float32)
    row = rng.standard_normal((2, 1, 3, 1, 4)).astype(np.float32)
    cache.write(0, np.zeros((2, 1, 3, 6, 4), np.float32), np.zeros((2, 1, 3, 6, 4), np.float32))
    cache.write(0, prefix, prefix)
    cache.write(2, row, -row)
    want[..., :2, :], want[..., 2:3, :] = prefix, row
    host = np.empty_like(want)
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    rt.cudaMemcpyAsync(host.ctypes.data, cache.keys.ptr, host.nbytes, kind, shared.stream)
    np.testing.assert_array_equal(host, want)
    feeds = cache.feeds()  # the decode engine's per-layer inputs: views into the two buffers
    assert list(feeds) == ["cache_keys.0", "cache_values.0", "cache_keys.1", "cache_values.1"]
    for i, sign in ((0, 1), (1, 1), (0, -1), (1, -1)):
        view = feeds[f"cache_{'keys' if sign > 0 else 'values'}.{i}"]
        assert view.shape == (1, 3, 6, 4) and view.owner is not None
        layer = np.empty(view.shape, np.float32)
        rt.cudaMemcpyAsync(layer.ctypes.data, view.ptr, layer.nbytes, kind, shared.stream)
        expect = want[i].copy()
        expect[..., 2:3, :] *= sign  # the values' row was written negated
        np.testing.assert_array_equal(layer, expect)
    with pytest.raises(ValueError, match="cannot write"):
        cache.write(6, row, row)  # past the capacity
    live = device.live()
    cache.close()
    del cache, feeds, view  # the layer views keep the buffers alive too
    import gc

    gc.collect()
    assert device.live() == live - 2  # the job's buffers went with it
    shared.close()


def test_simulation_is_strict(device, monkeypatch):
    rt = sim._cuda_module(device)
    ptr = rt.cudaMalloc(64)[1]
    device.view(ptr, 64)
    with pytest.raises(sim.SimulatedDeviceError, match="past its allocation"):
        device.view(ptr + 32, 64)
    rt.cudaFree(ptr)
    with pytest.raises(sim.SimulatedDeviceError, match="use after free"):
        device.view(ptr + 8, 4)
    with pytest.raises(sim.SimulatedDeviceError, match="already freed"):
        rt.cudaFree(ptr)
    stream = rt.cudaStreamCreateWithFlags(1)[1]
    rt.cudaStreamDestroy(stream)
    with pytest.raises(sim.SimulatedDeviceError, match="does not exist"):
        rt.cudaStreamSynchronize(stream)
