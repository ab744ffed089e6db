"""runtime.Generator over ONNX Runtime against the PyTorch reference, and its bad-input errors."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from runtime.folder.manifest import UNVERIFIED, EngineFolderError
from runtime.generator import Generator

FAST = dict(steps=4, decoder_steps=5)


@pytest.fixture(scope="module")
def gen(tiny_engine_dir):
    with Generator.from_dir(tiny_engine_dir) as g:
        yield g


@pytest.mark.slow
def test_generate_matches_reference_pipeline(gen, tiny_reference):
    """Same seed, same weights: the runtime's image equals the reference's.

    Tolerance: max abs pixel difference <= 2 of 255 (ORT vs PyTorch float32 kernels and the
    numpy vs torch Euler-discrete sigmas differ in the last bits).
    """
    for prompt, seed in [("a red circle", 0), ("two blue squares", 7)]:
        ours = np.asarray(gen.generate(prompt, seed=seed, **FAST)[0]).astype(int)
        ref = np.asarray(tiny_reference.generate(prompt, seed=seed, **FAST)).astype(int)
        assert np.abs(ours - ref).max() <= 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sampler", "decoder_sampler"), [("heun", "dpmpp_2m"), ("euler", "dpmpp_2m")]
)
def test_every_sampler_matches_the_reference_pipeline(
    gen, tiny_reference, sampler, decoder_sampler
):
    """The runtime's plans over the step graphs equal the reference's diffusers schedulers."""
    samplers = dict(sampler=sampler, decoder_sampler=decoder_sampler)
    # a prompt the trained tiny model inks at 4 + 5 steps (its single objects come out blank
    # that early), so that another sampler can show as another image
    prompt = "two blue squares"
    ours = np.asarray(gen.generate(prompt, seed=3, **FAST, **samplers)[0]).astype(int)
    ref = np.asarray(tiny_reference.generate(prompt, seed=3, **FAST, **samplers))
    default = np.asarray(gen.generate(prompt, seed=3, **FAST)[0]).astype(int)
    assert np.abs(ours - ref.astype(int)).max() <= 2
    assert np.abs(ours - default).max() > 2  # another sampler: another image


def test_a_preset_and_its_settings_give_the_same_image(gen):
    fast = gen.manifest["sampler"]["presets"]["fast"]
    job = gen.start("a red circle", preset="fast")
    assert {k: getattr(job.params, k) for k in fast} == fast
    dit = 2 * job.params.steps - 1 if job.params.sampler == "heun" else job.params.steps
    assert job.total == 1 + dit + job.params.decoder_steps + 1
    job.cancel()
    a = gen.generate("a red circle", seed=1, preset="fast", decoder_steps=3)[0]
    b = gen.generate("a red circle", seed=1, **{**fast, "decoder_steps": 3})[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_negative_features_are_the_built_file_and_match_reference(gen, tiny_reference):
    """tiny's decoder negative is zeros (its UNet's dropped condition), in reference and runtime."""
    assert gen.manifest["sampler"]["decoder_negative"] == "zeros"
    assert tiny_reference.config.sampler.decoder_negative == "zeros"
    entry = gen.manifest["host"]["negative_features"]
    ours = gen.folder.negative_features
    np.testing.assert_array_equal(ours, np.load(gen.folder.path / entry["file"]))
    np.testing.assert_allclose(ours, tiny_reference.negative_features().numpy(), atol=1e-4)


def test_answer_matches_reference(gen, tiny_reference):
    image = np.full((64, 64, 3), 255, np.uint8)
    image[8:28, 30:50] = (40, 80, 220)
    for question in ["Describe the image.", "How many squares are there?"]:
        ours = gen.answer(image, question, max_new_tokens=6)
        ref = tiny_reference.answer(image, question, max_new_tokens=6)
        assert ours == ref


def test_answer_streams_the_same_text(gen):
    image = np.full((48, 80, 3), 200, np.uint8)
    pieces = []
    text = gen.answer(image, "Describe the image.", max_new_tokens=5, stream=pieces.append)
    assert "".join(pieces).strip() == text


def test_stepwise_job_counts_and_equals_generate(gen):
    job = gen.start("a green triangle", seed=3, **FAST)
    stages = []
    while not job.done:
        upcoming = job.stage  # what the next step runs: a caller can step stage by stage
        stages.append(job.step())
        assert stages[-1] == upcoming
    assert job.stage == "done"
    assert stages == ["prefill"] + ["dit"] * 4 + ["unet"] * 5 + ["vae_decoder"]
    assert len(stages) == job.total
    again = gen.generate("a green triangle", seed=3, **FAST)[0]
    assert np.array_equal(np.asarray(job.result()[0]), np.asarray(again))


def test_low_memory_mode_gives_the_same_image(gen, tiny_engine_dir):
    with Generator.from_dir(tiny_engine_dir, low_memory=True) as low:
        a = low.generate("a yellow square", seed=2, **FAST)[0]
        assert low._sessions == {}
    b = gen.generate("a yellow square", seed=2, **FAST)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_num_images(gen):
    images = gen.generate("three red circles", seed=0, num_images=2, **FAST)
    assert len(images) == 2 and images[0].size == (64, 64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt="a " * 600), "at most"),
        (dict(prompt="a", steps=0), r"steps must be in \[1, 1000\]"),
        (dict(prompt="a", steps=True), "steps must be an integer"),
        (dict(prompt="a", guidance=1e38), "guidance must be a finite number in"),
        (dict(prompt="a", guidance=float("nan")), "guidance must be a finite"),
        (dict(prompt="a", decoder_guidance=-1), "decoder_guidance"),
        (dict(prompt="a", seed=-1), "seed must be in"),
        (dict(prompt="a", num_images=9), "num_images"),
    ],
)
def test_generate_rejects_bad_input(gen, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gen.generate(**kwargs)


def test_answer_rejects_bad_images(gen, tmp_path):
    bogus = tmp_path / "x.png"
    bogus.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read an image"):
        gen.answer(bogus, "Describe the image.")
    with pytest.raises(ValueError, match="smaller than one"):
        gen.answer(np.zeros((1, 1, 3), np.uint8), "Describe the image.")
    big = tmp_path / "big.png"
    Image.new("RGB", (9000, 8000)).save(big)
    with pytest.raises(ValueError, match="at most"):
        gen.answer(big, "Describe the image.")
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.answer(np.zeros((64, 64, 3), np.uint8), "q", max_new_tokens=0)


def test_engine_folder_errors(tiny_engine_dir, tmp_path):
    with pytest.raises(EngineFolderError, match="does not exist"):
        Generator.from_dir(tmp_path / "nope")
    with pytest.raises(EngineFolderError, match="has no manifest.json"):
        Generator.from_dir(tmp_path)
    with pytest.raises(EngineFolderError, match="not 4b"):
        Generator.from_dir(tiny_engine_dir, variant="4b")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_engine_dir, broken)
    size = (broken / "vae_decoder.fp32.onnx").stat().st_size
    (broken / "vae_decoder.fp32.onnx").write_bytes(b"garbage")
    with pytest.raises(EngineFolderError, match="7 bytes.*truncated.*rebuild with: python export/"):
        Generator.from_dir(broken)  # the fast check: sizes
    (broken / "vae_decoder.fp32.onnx").write_bytes(b"g" * size)  # same size, other bytes
    (broken / UNVERIFIED).unlink(missing_ok=True)  # opened before: "fast" checks sizes only
    Generator.from_dir(broken, verify="fast").close()
    with pytest.raises(EngineFolderError, match="sha256.*rebuild with: python export/build_"):
        Generator.from_dir(broken, verify="full")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["format"] = 99
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineFolderError, match="manifest format 99"):
        Generator.from_dir(broken)


def test_generation_imports_no_torch(tiny_engine_dir):
    code = textwrap.dedent(
        f"""
        import sys
        from runtime.generator import Generator
        with Generator.from_dir({str(tiny_engine_dir)!r}) as g:
            g.generate("a red circle", seed=0, steps=2, decoder_steps=2)
            g.answer(g.generate("a", steps=1, decoder_steps=1)[0], "q", max_new_tokens=2)
        heavy = [m for m in sys.modules
                 if m.split(".")[0] in ("torch", "transformers", "diffusers")]
        assert not heavy, heavy
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.slow
def test_fp16_engine_folder_matches_fp32(tmp_path_factory, gen):
    """fp16 graphs (norms, RoPE and time embeddings kept in fp32) run in ORT CPU end to end.

    Tolerance: max abs pixel difference <= 3 of 255 against the fp32 folder.
    """
    from export.build_plan import BuildRequest, build

    out = tmp_path_factory.mktemp("fp16") / "tiny-fp16"
    graphs = ("prefill", "dit_step", "unet_step", "vae_decoder")
    build(BuildRequest(variant="tiny", precision="fp16", out=out, graphs=graphs, progress=False))
    with Generator.from_dir(out) as half:
        a = np.asarray(half.generate("a red circle", seed=5, **FAST)[0]).astype(int)
    b = np.asarray(gen.generate("a red circle", seed=5, **FAST)[0]).astype(int)
    assert np.abs(a - b).max() <= 3


def _params(i):  # different step counts, so one job leaves a stage while another is in it
    return dict(seed=i, steps=2 + 2 * i, decoder_steps=3 + i)


def _interleaved(g, prompts):
    jobs = [g.start(p, **_params(i)) for i, p in enumerate(prompts)]
    while not all(j.done for j in jobs):
        for j in jobs:
            if not j.done:
                j.step()
    return [np.asarray(j.result()[0]) for j in jobs]


@pytest.mark.parametrize("low_memory", [False, True])
def test_interleaved_jobs_equal_jobs_run_alone(gen, tiny_engine_dir, low_memory):
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    alone = [np.asarray(gen.generate(p, **_params(i))[0]) for i, p in enumerate(prompts)]
    with Generator.from_dir(tiny_engine_dir, low_memory=low_memory) as g:
        mixed = _interleaved(g, prompts)
        if low_memory:  # the last job to finish closed what overlapping jobs kept open
            assert g._sessions == {}
    for a, b in zip(alone, mixed):
        assert np.array_equal(a, b)


def test_jobs_stepped_from_threads_are_serialized(gen):
    import threading

    prompts = ["a red circle", "two blue squares"]
    alone = [np.asarray(gen.generate(p, seed=i, **FAST)[0]) for i, p in enumerate(prompts)]
    results = {}

    def run(i, p):
        job = gen.start(p, seed=i, **FAST)
        while not job.done:
            job.step()
        results[i] = np.asarray(job.result()[0])

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(alone[i], results[i]) for i in range(2))


def test_device_follows_the_backend_and_bf16_feeds_are_bfloat16():
    import ml_dtypes

    from runtime.folder.engine_folder import host_io_dtype
    from runtime.generator import default_device

    assert default_device("tensorrt") == "cuda" and default_device("onnxruntime") == "cpu"
    assert host_io_dtype("bf16") == np.dtype(ml_dtypes.bfloat16)  # was astype(None): float64
    assert host_io_dtype("fp16") == np.float16 and host_io_dtype("int8") == np.float32
