"""export/build_engines.py: manifest contents, caching, interruption, bad input, check command."""

import json
import os
from pathlib import Path

import pytest

from export import build_engines, check
from export.build_plan import BuildError, BuildRequest, build
from runtime.folder.graphs import RUNTIME_GRAPHS
from runtime.folder.manifest import load_manifest, sha256_file
from runtime.folder.spec import spec_from_dict


def test_manifest_describes_the_folder(tiny_engine_dir):
    m = load_manifest(tiny_engine_dir)
    assert (m["variant"], m["precision"], m["backend"]) == ("tiny", "fp32", "onnxruntime")
    if m["checkpoint"]["path"]:  # the shipped trained checkpoint
        assert m["weights"].startswith("checkpoint") and len(m["checkpoint"]["hash"]) == 64
    else:
        assert "RANDOM weights" in m["weights"]
        assert m["checkpoint"]["hash"] == "random-weights-seed-0"
    assert m["sampler"]["steps"] == 30 and m["sampler"]["image_size"] == 64
    assert m["template"]["generation_instruction"].startswith("Please generate image")
    assert m["tools"]["onnxruntime"] and m["tools"]["torch"]
    for name, entry in m["graphs"].items():
        assert sha256_file(tiny_engine_dir / entry["file"]) == entry["sha256"]
        assert spec_from_dict(entry["spec"]).name == name
    assert set(m["host"]) == {"tokenizer", "embeddings", "latent_queries", "negative_features"}
    for entry in m["host"].values():
        assert sha256_file(tiny_engine_dir / entry["file"]) == entry["sha256"]
    assert m["sampler"]["decoder_negative"] == m["stages"]["negative"]["decoder_negative"]


def test_second_run_is_a_no_op(tiny_engine_dir, caplog):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_engine_dir.iterdir()}
    caplog.set_level("INFO", logger="export.build_folder")
    build(BuildRequest(variant="tiny", out=tiny_engine_dir, graphs=RUNTIME_GRAPHS, progress=False))
    after = {p.name: p.stat().st_mtime_ns for p in tiny_engine_dir.iterdir() if p.name in before}
    changed = [n for n in before if before[n] != after[n] and n != "manifest.json"]
    assert changed == []
    assert "done" not in caplog.text
    assert caplog.text.count("up to date") == 2 + len(RUNTIME_GRAPHS)  # assets, negative, graphs


@pytest.mark.slow  # builds an engine folder
def test_interrupted_build_leaves_no_partial_files(tmp_path, monkeypatch):
    import export.onnx_export as onnx_export

    out = tmp_path / "tiny-fp32"
    real = onnx_export.export_graph

    def flaky(module, spec, path, **kw):
        if spec.name == "vae_decoder":
            path.write_bytes(b"half an onnx file")
            raise KeyboardInterrupt
        return real(module, spec, path, **kw)

    monkeypatch.setattr(onnx_export, "export_graph", flaky)
    request = BuildRequest(variant="tiny", out=out, graphs=("dit", "vae_decoder"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        build(request)
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if "partial" in n or "tmp" in n], names
    assert "dit.fp32.onnx" in names and "vae_decoder.fp32.onnx" not in names
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert "export:dit" in stages and "export:vae_decoder" not in stages
    dit = out / "dit.fp32.onnx"
    dit_sha, dit_mtime = sha256_file(dit), dit.stat().st_mtime_ns
    monkeypatch.setattr(onnx_export, "export_graph", real)
    build(request)
    assert sha256_file(dit) == dit_sha and dit.stat().st_mtime_ns == dit_mtime
    assert (out / "vae_decoder.fp32.onnx").is_file()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(variant="huge"), "unknown variant 'huge'; valid: tiny, 4b, 8b"),
        (dict(variant="tiny", precision="int4"), "unknown precision 'int4'"),
        (dict(variant="tiny", backend="coreml"), "unknown backend"),
        (dict(variant="tiny", graphs=("unet", "clip")), r"unknown graph\(s\) \['clip'\]"),
        (dict(variant="4b"), "needs --checkpoint DIR.*huggingface.co/BLIP3o/BLIP3o-Model-4B"),
        (dict(variant="tiny", random_weights=True, checkpoint=Path(".")), "exclude each other"),
        (dict(variant="tiny", decoder_negative="none"), "decoder negative 'none'; valid: blank"),
    ],
)
def test_bad_requests(kwargs, match, tmp_path):
    with pytest.raises(BuildError, match=match):
        build(BuildRequest(out=tmp_path / "x", dry_run=True, **kwargs))




def test_fp8_on_a_gpu_without_fp8(monkeypatch, tmp_path):
    import export.trt_build as trt_build

    monkeypatch.setattr(trt_build, "compute_capability", lambda *a: (8, 7))
    with pytest.raises(BuildError, match="fp8.*SM 8.7.*Orin"):
        build(
            BuildRequest(
                variant="tiny",
                precision="fp8",
                backend="tensorrt",
                dry_run=True,
                out=tmp_path / "x",
            )
        )


def test_tensorrt_backend_without_tensorrt_is_a_clear_error(tmp_path):
    with pytest.raises(BuildError, match="needs TensorRT"):
        build(BuildRequest(variant="tiny", backend="tensorrt", out=tmp_path / "x"))


def test_out_folder_of_another_variant(tiny_engine_dir):
    with pytest.raises(BuildError, match="holds a tiny-fp32 engine folder"):
        build(BuildRequest(variant="tiny", precision="fp16", out=tiny_engine_dir, dry_run=True))


def test_checkpoint_of_another_variant(tmp_path, tiny_pipeline):
    from training.checkpoint import save_model

    save_model(
        tiny_pipeline.model,
        tmp_path / "ckpt",
        tokenizer=tiny_pipeline.tokenizer,
        decoder=tiny_pipeline.decoder,
    )
    with pytest.raises(BuildError, match="is a tiny checkpoint, not 4b"):
        build(
            BuildRequest(
                variant="4b", checkpoint=tmp_path / "ckpt", dry_run=True, out=tmp_path / "x"
            )
        )


def test_cli_dry_run_and_errors(capsys, tmp_path):
    assert build_engines.main(["--variant", "tiny", "--dry-run", "--out", str(tmp_path / "e")]) == 0
    plan = capsys.readouterr().out
    assert all(f"export:{g}" in plan for g in RUNTIME_GRAPHS) and "will run" in plan
    assert "export:unet " not in plan
    assert not (tmp_path / "e").exists()
    assert build_engines.main(["--variant", "8b", "--out", str(tmp_path / "e")]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err


def test_check_command(tiny_engine_dir, tmp_path, capsys):
    assert check.main([str(tiny_engine_dir), "--graphs", "dit_step", "vae_decoder"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "6 passed, 0 failed" in out
    assert check.main([str(tmp_path)]) == 2


def test_partial_leftovers_are_cleaned(tmp_path):
    import subprocess
    import sys

    from export.build_folder import remove_partials

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(gone.stdout)  # the writer of these leftovers has exited
    (tmp_path / f".partial-{dead}-export-dit").mkdir()
    (tmp_path / f".partial-{dead}-export-dit" / "dit.fp32.onnx").write_bytes(b"x")
    (tmp_path / f"manifest.json.tmp-{dead}").write_text("{")
    (tmp_path / "keep.onnx").write_bytes(b"y")
    removed = remove_partials(tmp_path)
    assert len(removed) == 2 and os.listdir(tmp_path) == ["keep.onnx"]


@pytest.mark.slow  # builds and quantizes an engine folder
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_folder(tmp_path, precision):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration\na red circle\ntwo blue squares\n")
    out = tmp_path / f"tiny-{precision}"
    build(
        BuildRequest(
            variant="tiny",
            precision=precision,
            out=out,
            progress=False,
            graphs=("dit_step", "vae_decoder"),
            calibration_prompts=prompts,
            calibration_steps=(3, 3),
        )
    )
    m = load_manifest(out)
    for name in ("dit_step", "vae_decoder"):
        entry = m["graphs"][name]
        assert entry["file"] == f"{name}.{precision}.onnx" and entry["precision"] == precision
        q = entry["quantization"]
        assert q["error_vs_fp32"]["cosine_min"] > 0.9
    assert check.main([str(out)]) == 0


@pytest.mark.slow  # builds an engine folder
def test_disk_full_mid_stage_keeps_earlier_artifacts(tmp_path, monkeypatch, capsys):
    import errno

    import export.onnx_export as onnx_export

    out = tmp_path / "tiny-fp32"
    real = onnx_export.export_graph

    def full(module, spec, path, **kw):
        if spec.name == "vae_decoder":
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(module, spec, path, **kw)

    monkeypatch.setattr(onnx_export, "export_graph", full)
    args = ["--variant", "tiny", "--out", str(out), "--graphs", "dit_step", "vae_decoder", "-q"]
    assert build_engines.main(args) == 1
    assert "No space left on device" in capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert "dit_step.fp32.onnx" in names and not [n for n in names if "vae" in n or "partial" in n]


def test_random_weights_at_4b_shapes_need_no_checkpoint(tmp_path, capsys):
    build(BuildRequest(variant="4b", random_weights=True, dry_run=True, out=tmp_path / "x"))
    assert "RANDOM weights" in capsys.readouterr().out
