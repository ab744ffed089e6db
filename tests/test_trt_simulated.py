"""The TensorRT session's control flow on a simulated device (`tests/simulated_device.py`): runs,
CUDA-graph capture and replay, release in low-memory mode, interleaved jobs, the in-place KV
cache, against the onnxruntime backend on the same graphs; and its error paths: CUDA error codes,
refused tensor addresses (256-byte alignment), host tensors, another thread's current device.
The simulation faults on any use of freed or unknown device memory, runs queued work only when
something waits for it, and its engines compute for real (ONNX Runtime underneath)."""

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
    assert device.streams == {}  # the shared stream went with the Generator
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
            assert decode.kv_cache((1, 1, 1, 4, 2), np.float32).layers[0][0].owner is not None


def test_outputs_aliasing_session_buffers_fail_on_the_simulation(trt_folder, device, monkeypatch):
    """The defect the owned copies fix, reproduced: with outputs pointing into the session's
    buffers, low-memory release frees the UNet's latents before the VAE reads them."""
    from runtime.sessions import tensorrt as trt_session

    def alias(self, name, shape):
        return trt_session.DeviceArray(self._buffers[name], shape, self._plan[name][1], self.stream)

    monkeypatch.setattr(trt_session.TrtSession, "_copy_out", alias)
    with pytest.raises(trt_session.CudaError, match="cudaErrorIllegalAddress"):
        with Generator.from_dir(trt_folder, backend="tensorrt", low_memory=True) as g:
            g.generate("a red circle", **FAST)
    assert "use after free" in device.faults[0]  # as a GPU: an error code, the fault sticks


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


def _device_copy(shared, host: np.ndarray, offset: int = 0):
    """A host array uploaded into a fresh owned device buffer (at `offset` bytes into it)."""
    from runtime.sessions.tensorrt import DeviceArray, DeviceBuffer, check, cuda_runtime

    rt = cuda_runtime()
    buf = DeviceBuffer(rt, host.nbytes + offset)
    kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    check(rt.cudaMemcpyAsync(buf.ptr + offset, host.ctypes.data, host.nbytes, kind, shared.stream))
    return DeviceArray(buf.ptr + offset, host.shape, host.dtype, shared.stream, buf)


@pytest.mark.parametrize(("dtype", "capacity"), [(np.float32, 6), (np.float16, 5)])
def test_device_kv_cache_writes_rows_in_place(device, dtype, capacity):
    """Rows land where they belong, and every layer's view is 256-byte aligned: TensorRT
    refuses other addresses (tiny's D = 32 at 16 bits and an odd capacity: 128 bytes off)."""
    from runtime.sessions.tensorrt import DeviceKVCache, SharedDevice, cuda_runtime

    shared = SharedDevice()
    rt = cuda_runtime()
    shape = (2, 1, 2, capacity, 32)
    cache = DeviceKVCache(rt, shared.stream, shape, dtype)
    want = np.zeros(shape, dtype)
    rng = np.random.default_rng(0)
    prefix = rng.standard_normal((2, 1, 2, 2, 32)).astype(dtype)
    row = rng.standard_normal((2, 1, 2, 1, 32)).astype(dtype)
    cache.write(0, np.zeros(shape, dtype), np.zeros(shape, dtype))
    cache.write(0, prefix, prefix)
    cache.write(2, row, -row)
    want[..., :2, :], want[..., 2:3, :] = prefix, row
    keys, values = cache.to_host()
    np.testing.assert_array_equal(keys, want)
    want[..., 2:3, :] = -row
    np.testing.assert_array_equal(values, want)
    feeds = cache.feeds()  # the decode engine's per-layer inputs: views into the two buffers
    assert list(feeds) == ["cache_keys.0", "cache_values.0", "cache_keys.1", "cache_values.1"]
    assert all(v.ptr % 256 == 0 for v in feeds.values()), [hex(v.ptr) for v in feeds.values()]
    assert all(v.shape == shape[1:] and v.owner is not None for v in feeds.values())
    with pytest.raises(ValueError, match="cannot write"):
        cache.write(capacity, row, row)  # past the capacity
    live = device.live()
    cache.close()
    del cache, feeds  # the layer views keep the buffers alive too
    import gc

    gc.collect()
    assert device.live() == live - 2  # the job's buffers went with it
    shared.close()


def test_simulation_is_strict(device, monkeypatch):
    """Errors are codes, as in cuda-python; queued work runs when waited for; faults stick."""
    from runtime.sessions.tensorrt import CudaError, check

    rt = sim._cuda_module(device)
    err, ptr = rt.cudaMalloc(64)
    assert err == 0 and ptr % 256 == 0
    device.view(ptr, 64)
    with pytest.raises(sim.SimulatedDeviceError, match="past its allocation"):
        device.view(ptr + 32, 64)
    assert rt.cudaFree(ptr) == (rt.cudaError_t.cudaSuccess,)
    with pytest.raises(sim.SimulatedDeviceError, match="use after free"):
        device.view(ptr + 8, 4)
    assert rt.cudaFree(ptr) == (rt.cudaError_t.cudaErrorInvalidValue,)  # freed twice
    with pytest.raises(CudaError, match="cudaFree failed: cudaErrorInvalidValue"):
        check(rt.cudaFree(ptr), "cudaFree")
    err, stream = rt.cudaStreamCreateWithFlags(1)
    assert not isinstance(stream, int) and int(stream) in device.streams  # an object, as real
    rt.cudaStreamDestroy(stream)
    assert rt.cudaStreamSynchronize(stream)[0] == rt.cudaError_t.cudaErrorInvalidResourceHandle
    # queued work runs only when something waits: a read before the sync sees garbage
    stream = rt.cudaStreamCreateWithFlags(1)[1]
    buf = rt.cudaMalloc(16)[1]
    src, out = np.arange(4, dtype=np.float32), np.zeros(4, np.float32)
    kinds = rt.cudaMemcpyKind
    rt.cudaMemcpyAsync(buf, src.ctypes.data, 16, kinds.cudaMemcpyHostToDevice, stream)
    rt.cudaMemcpyAsync(out.ctypes.data, buf, 16, kinds.cudaMemcpyDeviceToHost, stream)
    assert not out.any()  # not yet
    rt.cudaStreamSynchronize(stream)
    np.testing.assert_array_equal(out, src)
    # a fault in queued work is an error code at the next wait, and every call after it
    rt.cudaMemcpyAsync(out.ctypes.data, ptr, 16, kinds.cudaMemcpyDeviceToHost, stream)
    assert rt.cudaStreamSynchronize(stream)[0] == rt.cudaError_t.cudaErrorIllegalAddress
    assert rt.cudaMalloc(16)[0] == rt.cudaError_t.cudaErrorIllegalAddress
    assert "use after free" in device.faults[0]


# ---- error paths: what the real API reports by return value ------------------------------------
def _vae(trt_folder, shared=None, **options):
    from runtime.folder.manifest import read_manifest
    from runtime.sessions.tensorrt import TrtSession

    manifest = read_manifest(trt_folder)
    entry = manifest["graphs"]["vae_decoder"]
    spec = graph_spec(manifest, "vae_decoder")
    return TrtSession(spec, trt_folder / entry["engine"]["file"], shared=shared, **options)


def test_misaligned_device_feed_is_copied_not_bound(trt_folder, tiny_engine_dir, device):
    """TensorRT refuses an address that is not 256-byte aligned (`set_tensor_address` returns
    False): such a feed is copied into the session's aligned input buffer instead, and the
    engine reads it (ignoring the refusal, it read whatever was bound before)."""
    import onnxruntime as ort

    from runtime.sessions.tensorrt import SharedDevice

    shared = SharedDevice()
    vae = _vae(trt_folder, shared)
    spec = vae.spec
    first, second = sample_inputs(spec, seed=0), sample_inputs(spec, seed=1)
    vae.to_host(vae.run(first)["images"])
    feed = _device_copy(shared, second["latents"], offset=128)  # 128 bytes off
    got = vae.to_host(vae.run({"latents": feed})["images"])
    reference = ort.InferenceSession(str(tiny_engine_dir / "vae_decoder.fp32.onnx"))
    np.testing.assert_allclose(got, reference.run(None, second)[0], atol=1e-5)
    vae.close()
    shared.close()


def test_refused_tensor_address_raises(trt_folder, device, monkeypatch):
    from tests import simulated_tensorrt

    def refuse(self, name, memory):
        return False

    trt = __import__("tensorrt")
    context = type(
        trt.Runtime(None)
        .deserialize_cuda_engine(
            sim.PLAN_MAGIC + (trt_folder / "vae_decoder.fp32.onnx").read_bytes()
        )
        .create_execution_context(
            simulated_tensorrt.ExecutionContextAllocationStrategy.USER_MANAGED
        )
    )
    monkeypatch.setattr(context, "set_tensor_address", refuse)
    with pytest.raises(RuntimeError, match="TensorRT refused address 0x[0-9a-f]+ for latents"):
        _vae(trt_folder)


def test_refused_shape_and_failed_enqueue_raise(trt_folder, device):
    vae = _vae(trt_folder)
    bad = sample_inputs(vae.spec, seed=0)
    vae._context.engine.device_memory_size_v2 = 4096
    vae._context.set_device_memory = lambda ptr, size: None  # never bound: enqueue fails
    with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
        vae.run(bad)
    vae.close()


def test_host_tensors_are_refused(trt_folder, device):
    """An engine input in host memory (a shape tensor) would be read from a device pointer at
    enqueue: the session refuses the engine when it opens."""
    device.host_tensors = {"latents"}
    with pytest.raises(ValueError, match="latents: engine input lives in HOST memory"):
        _vae(trt_folder)


def test_session_runs_from_another_thread_on_its_device(trt_folder, tiny_engine_dir, device):
    """The current CUDA device is per thread: a session on cuda:1 opened in one thread and run
    from another selects its device first (the new thread's current device is 0)."""
    import threading

    import onnxruntime as ort

    vae = _vae(trt_folder, device="cuda:1")
    feeds = sample_inputs(vae.spec, seed=3)
    out, errors = {}, []

    def work():
        try:
            out["images"] = vae.to_host(vae.run(feeds)["images"])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors, errors
    reference = ort.InferenceSession(str(tiny_engine_dir / "vae_decoder.fp32.onnx"))
    np.testing.assert_allclose(out["images"], reference.run(None, feeds)[0], atol=1e-5)
    vae.close()


def test_a_missing_sync_shows(trt_folder, device, monkeypatch):
    """Work runs when something waits for it: reading an output without a stream sync gives
    what the host buffer held before (here: zeros), as on a GPU."""
    from runtime.sessions.tensorrt import TrtSession

    def to_host_without_sync(self, value):
        out = np.zeros(value.shape, value.dtype)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._rt.cudaMemcpyAsync(out.ctypes.data, value.ptr, value.nbytes, kind, value.stream)
        return out

    vae = _vae(trt_folder)
    feeds = sample_inputs(vae.spec, seed=0)
    assert vae.to_host(vae.run(feeds)["images"]).any()
    monkeypatch.setattr(TrtSession, "to_host", to_host_without_sync)
    assert not vae.to_host(vae.run(feeds)["images"]).any()
    vae.close()


def test_build_engine_clears_tf32_and_its_plan_runs(tiny_engine_dir, device, tmp_path):
    """`build_engine` over the simulated builder: strongly typed, TF32 cleared (TensorRT turns
    it on by default: fp32 engines would compute in TF32), profiles and workspace from the
    plan; the written plan deserializes and runs."""
    from export.trt_build import build_engine
    from export.trt_plan import plan_engines
    from tests.simulated_tensorrt import BuilderFlag

    manifest = read_manifest(tiny_engine_dir)
    entry = manifest["graphs"]["vae_decoder"]
    spec = graph_spec(manifest, "vae_decoder")
    (plan,) = plan_engines(
        {"vae_decoder": spec},
        {"vae_decoder": {"file": entry["file"], "sha256": entry["sha256"]}},
        precision="fp32", sm=sim.SM, trt_version=sim.TRT_VERSION,
    )  # fmt: skip
    assert plan.cleared_flags == ("TF32",)
    out = build_engine(plan, tiny_engine_dir / entry["file"], tmp_path / plan.engine_file,
                       timing_cache=tmp_path / "timing.cache")  # fmt: skip
    (build,) = device.builds
    assert BuilderFlag.TF32 not in build["flags"]
    assert build["profiles"] == [dict(plan.profiles[0])]
    assert build["network_flags"] == 1 << 1  # STRONGLY_TYPED
    from runtime.sessions.tensorrt import TrtSession

    vae = TrtSession(spec, out)
    assert vae.to_host(vae.run(sample_inputs(spec))["images"]).shape == (1, 3, 64, 64)
    vae.close()


def test_check_refuses_an_engine_whose_sha256_differs(trt_folder, device, tmp_path):
    """`export/check.py` reads each engine once and checks its sha256 before deserializing, as
    the session does (it handed polygraphy the path, unchecked)."""
    import shutil

    from export.check import check_folder
    from runtime.folder.manifest import EngineFolderError

    folder = tmp_path / "tampered"
    shutil.copytree(trt_folder, folder)
    engine = folder / read_manifest(folder)["graphs"]["vae_decoder"]["engine"]["file"]
    data = bytearray(engine.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    engine.write_bytes(bytes(data))
    with pytest.raises(EngineFolderError, match="does not match the sha256"):
        check_folder(folder, ["vae_decoder"])
