"""build_engines.py on published-form checkpoints: damaged ones stop before any folder is made,
the decoder's scheduler is checked, each stage loads one component, calibration runs on the
build's device, and the dry run prints memory, disk and calibration cost."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from export import build_engines
from export.build_plan import BuildError, BuildRequest, build
from training.model.blip3o import BLIP3o
from training.model.decoder import Decoder
from training.published import write_published


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_config, tiny_tokenizer):
    torch.manual_seed(6)
    model, decoder = BLIP3o(tiny_config).eval(), Decoder(tiny_config.decoder).eval()
    folder = tmp_path_factory.mktemp("build") / "ckpt"
    return write_published(model, decoder, tiny_tokenizer, folder, max_shard_bytes=1 << 20)


@pytest.fixture
def copy(source, tmp_path):
    return shutil.copytree(source, tmp_path / "ckpt")


def _main(capsys, ckpt, out, *extra):
    rc = build_engines.main(["--variant", "tiny", "--checkpoint", str(ckpt), "--out", str(out),
                             "-q", *extra])  # fmt: skip
    return rc, capsys.readouterr().err


def _truncate(folder):
    path = sorted(folder.glob("model-*-of-*.safetensors"))[2]
    path.write_bytes(path.read_bytes()[:1000])
    return path.name


def _no_config(folder):
    (folder / "config.json").unlink()
    return "has no config.json"


def _no_tokenizer(folder):
    (folder / "vocab.json").unlink()
    return "has no tokenizer.json, and no vocab.json to build it from"


def _no_shard(folder):
    sorted(folder.glob("model-*-of-*.safetensors"))[3].unlink()
    return "lists shard(s) missing"


def _no_vae(folder):
    (folder / "diffusion-decoder" / "vae" / "diffusion_pytorch_model.bf16.safetensors").unlink()
    return "vae has no weight file"


@pytest.mark.parametrize("damage", [_truncate, _no_config, _no_tokenizer, _no_shard, _no_vae])
def test_a_bad_checkpoint_is_one_line_and_leaves_no_folder(copy, tmp_path, capsys, damage):
    said = damage(copy)
    out = tmp_path / "engines" / "tiny-fp32"
    rc, err = _main(capsys, copy, out)
    assert rc == 2 and said in err and err.count("\n") == 1, err
    assert "run again" not in err and "Traceback" not in err
    assert not out.exists() and not out.parent.exists()


def test_the_decoder_scheduler_is_checked_or_overridden(copy, tmp_path, capsys):
    path = copy / "diffusion-decoder" / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"beta_end": 0.02}))
    rc, err = _main(capsys, copy, tmp_path / "e", "--dry-run")
    assert rc == 2 and "beta_end = 0.02 (the tiny preset: 0.012)" in err
    assert _main(capsys, copy, tmp_path / "e", "--dry-run", "--decoder-scheduler", "preset")[0] == 0
    request = BuildRequest(variant="tiny", checkpoint=copy, out=tmp_path / "e", dry_run=True,
                           decoder_scheduler="checkpoint")  # fmt: skip
    from export.source import ModelSource

    assert ModelSource(request, "fp32").config.decoder.beta_end == 0.02  # into the manifest


@pytest.mark.slow
def test_each_stage_loads_one_component_in_the_build_precision(copy, tmp_path, monkeypatch):
    import training.checkpoint as ckpt
    import training.decoder_folder as decoder_folder

    calls = []
    load_model, load_decoder = ckpt.load_model, decoder_folder.load_decoder

    def recording_model(folder, **kw):
        calls.append(("model", kw["parts"], kw["dtype"]))
        return load_model(folder, **kw)

    def recording_decoder(cfg, folder, **kw):
        calls.append(("decoder", kw["parts"], kw["dtype"]))
        return load_decoder(cfg, folder, **kw)

    monkeypatch.setattr(ckpt, "load_model", recording_model)
    monkeypatch.setattr(decoder_folder, "load_decoder", recording_decoder)
    graphs = ("dit_step", "vae_decoder")
    build(BuildRequest(variant="tiny", checkpoint=copy, precision="fp16", graphs=graphs,
                       out=tmp_path / "e", progress=False))  # fmt: skip
    host = ("qwen.model.language_model.embed_tokens.", "latent_queries")
    assert calls == [
        ("model", host, torch.float16),
        ("model", ("dit.",), torch.float16),
        ("decoder", ("vae",), torch.float16),
    ]


@pytest.mark.slow
def test_calibration_runs_phase_by_phase_on_the_builds_device(copy, tmp_path, monkeypatch):
    import export.quantize_stages as quantize_stages
    from export.build_folder import BuildFolder, tool_versions
    from export.build_plan import _run_stage, _start_manifest
    from export.components import CALIBRATION_PHASES
    from export.dims import graph_dims
    from export.source import ModelSource
    from export.stage_factory import StageFactory
    from runtime.folder.graphs import graph_specs

    asked = []
    monkeypatch.setattr(quantize_stages, "calibration_device", lambda r: asked.append(r) or "cpu")
    request = BuildRequest(variant="tiny", checkpoint=copy, precision="int8", device="cuda",
                           calibration_steps=(2, 2), calibration_count=1)  # fmt: skip
    source = ModelSource(request, "int8")
    loads = []
    real = source.load
    monkeypatch.setattr(source, "load", lambda c, **kw: loads.append((c, kw)) or real(c, **kw))
    specs = graph_specs(graph_dims(source.config))
    graphs = ("dit_step", "vae_decoder")
    factory = StageFactory(request, source, "int8", specs, tool_versions(), None, None, graphs)
    folder = tmp_path / "folder"
    folder.mkdir()
    engine = BuildFolder(folder, _start_manifest(folder, request, "int8", source, None, None,
                                                  tool_versions()))  # fmt: skip
    _run_stage(engine, factory.assets())
    _run_stage(engine, factory.negative(engine))  # tiny: zeros, no model
    loads.clear()
    data = factory.calibration(engine)
    assert asked == ["cuda"]
    # the runtime's jobs stepped stage by stage: each component loaded once, in order
    assert loads == [(p, {"dtype": "fp32", "device": "cpu"}) for p in CALIBRATION_PHASES]
    assert len(data["feeds"]["dit_step"]) == 2 and len(data["feeds"]["vae_decoder"]) == 1
    assert set(data["feeds"]) == set(graphs)  # only what the build quantizes
    assert len(data["held_out"]["dit_step"]) == 2 * 2


def test_calibration_device_is_cuda_when_torch_sees_one(monkeypatch):
    from export.source import calibration_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert calibration_device("auto") == "cuda" and calibration_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert calibration_device("auto") == "cpu"
    with pytest.raises(BuildError, match="--device cuda: torch sees no CUDA GPU"):
        calibration_device("cuda")


def test_dry_run_of_4b_prints_memory_disk_and_calibration(capsys, tmp_path):
    argv = [
        "--variant",
        "4b",
        "--random-weights",
        "--dry-run",
        "--precision",
        "fp8",
        "--backend",
        "tensorrt",
        "--out",
        str(tmp_path / "e"),
        "--calibration-count",
        "8",
    ]
    assert build_engines.main(argv) == 0  # fmt: skip
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[2:] if line.startswith("  ")}
    # a quantized TensorRT folder exports its text graphs at 16 bits (bf16 unless the GPU is older)
    assert "lm bf16" in lines["export:prefill"] and lines["export:prefill"].count("GB") == 2
    assert "calibration (cpu)" in lines["quantize:dit_step"] or "(cuda)" in out
    assert "calibration: 8 + 2 held-out prompts x (30 DiT + 50 UNet steps)" in out
    assert "1,550 UNet forwards" not in out and "500 UNet forwards" in out  # (8 + 2) x 50
    assert "estimated: peak host memory" in out and not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(layers=0), "layers must be an integer >= 1, got 0"),
        (dict(layers=5), "--layers 5: tiny has 4 layers"),
        (dict(calibration_count=0), "calibration_count must be an integer >= 1"),
        (dict(device="tpu"), "unknown device 'tpu'; valid: auto, cpu, cuda"),
        (dict(decoder_scheduler="x"), "unknown decoder scheduler mode 'x'"),
    ],
)
def test_bad_new_options(kwargs, match, tmp_path):
    with pytest.raises(BuildError, match=match):
        build(BuildRequest(variant="tiny", out=tmp_path / "x", dry_run=True, **kwargs))
