"""`runtime doctor`: verdicts for engine folders across backends, precisions and GPUs.

Machines are faked as `runtime.machine.probe.Facts` (the data the runtime and the exporter decide
from);
engine folders are hand-written manifests with empty files, so no graph is exported here.
"""

from __future__ import annotations

import json

import pytest

from runtime.folder.manifest import rebuild_hint
from runtime.machine import compat, probe
from runtime.machine.doctor import build_choices, format_text, report
from runtime.machine.probe import Facts, Gpu, OrtFacts

GRAPHS = ("vision", "prefill", "decode", "dit_step", "unet_step", "vae_decoder")
CPU_ORT = OrtFacts((("onnxruntime", "1.32.0"),), "1.32.0", ("CPUExecutionProvider",))
GPU_ORT = OrtFacts(
    (("onnxruntime-gpu", "1.23.0"),),
    "1.23.0",
    ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
)
OLD_GPU_ORT = OrtFacts((("onnxruntime-gpu", "1.20.0"),), "1.20.0", GPU_ORT.providers)


def machine(ort=CPU_ORT, gpu=None, trt=None, **kw) -> Facts:
    gpus = () if gpu is None else (Gpu(gpu[0], gpu[1], 60000, 81559),)
    cuda_python = "12.6.0" if trt else None
    return Facts("3.11.7", "Linux x86_64", "2.1.0", ort, gpus=gpus, tensorrt=trt,
                 cuda_python=cuda_python, **kw)  # fmt: skip


CPU = machine()
H100 = machine(GPU_ORT, ("NVIDIA H100 80GB HBM3", (9, 0)), "10.8.0.43", driver="570.86.15")
T4 = machine(GPU_ORT, ("Tesla T4", (7, 5)))
ORIN = machine(OLD_GPU_ORT, ("Orin", (8, 7)), "10.3.0.30", jetson="NVIDIA Jetson AGX Orin")


def folder(tmp_path, precision="fp32", backend="onnxruntime", trt=None, sm=None, **manifest):
    """A finished engine folder: manifest.json plus empty files for every listed entry."""
    graphs = {}
    for name in GRAPHS:
        graphs[name] = {"file": f"{name}.{precision}.onnx", "sha256": "0" * 64}
        graphs[name]["spec"] = {"name": name}
        if backend == "tensorrt":
            tag = f"trt{trt}.sm{sm.replace('.', '')}"
            graphs[name]["engine"] = {"file": f"{name}.{precision}.{tag}.plan"}
    data = {
        "format": 3,
        "variant": "tiny",
        "precision": precision,
        "backend": backend,
        "tensorrt": trt,
        "compute_capability": sm,
        "config": {},
        "graphs": graphs,
        "host": {"tokenizer": {"file": "tokenizer.json", "sha256": "0" * 64}},
        **manifest,
    }
    path = tmp_path / f"tiny-{precision}"
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps(data))
    for entry in [data["host"]["tokenizer"], *graphs.values()]:
        for f in (entry["file"], (entry.get("engine") or {}).get("file")):
            if f:
                (path / f).write_bytes(b"")
    return path


def verdicts(data: dict) -> dict:
    return {(v["backend"], v["device"]): v for v in data["engines"]["verdicts"]}


def test_fp32_folder_on_a_cpu_machine_loads_on_cpu(tmp_path):
    data = report(CPU, folder(tmp_path))
    e = data["engines"]
    assert data["ok"] and e["loads"] and e["use"] == {"backend": "onnxruntime", "device": "cpu"}
    assert e["run"].endswith(f"--engines {tmp_path / 'tiny-fp32'}")
    cuda = verdicts(data)[("onnxruntime", "cuda")]
    assert not cuda["ok"] and "CUDAExecutionProvider" in cuda["problems"][0]
    assert "blip3o-edge[gpu]" in cuda["problems"][0]
    assert ("tensorrt", "cuda") not in verdicts(data)  # no engines, no TensorRT: no candidate


def test_bf16_folder_needs_an_sm80_gpu(tmp_path):
    path = folder(tmp_path, "bf16")
    on_cpu = report(CPU, path)["engines"]
    assert not on_cpu["loads"]
    assert "bf16 graphs do not run on ONNX Runtime's CPU" in str(on_cpu["verdicts"])
    assert on_cpu["fix"] == rebuild_hint({"variant": "tiny", "precision": "fp32"})
    assert "--out" not in on_cpu["fix"]  # another precision builds another folder
    on_h100 = report(H100, path)["engines"]
    assert on_h100["loads"] and on_h100["use"] == {"backend": "onnxruntime", "device": "cuda"}
    on_t4 = report(T4, path)["engines"]
    cuda = verdicts({"engines": on_t4})[("onnxruntime", "cuda")]
    assert not on_t4["loads"] and "SM 7.5" in cuda["problems"][0]
    assert "use fp16" in cuda["problems"][0]


def test_tensorrt_folder_on_the_gpu_it_was_built_for(tmp_path):
    path = folder(tmp_path, "fp8", "tensorrt", trt="10.8.0", sm="9.0")
    e = report(H100, path)["engines"]
    assert e["loads"] and e["use"] == {"backend": "tensorrt", "device": "cuda"}
    assert e["run"].endswith("--backend tensorrt --device cuda")
    assert e["built_for"]["compute_capability"] == "9.0"


def test_tensorrt_folder_after_a_tensorrt_upgrade_is_rebuilt_in_place(tmp_path):
    path = folder(tmp_path, "fp8", "tensorrt", trt="10.7.0", sm="9.0")
    e = report(H100, path)["engines"]
    problem = verdicts({"engines": e})[("tensorrt", "cuda")]["problems"][0]
    assert "TensorRT version 10.7.0" in problem and "10.8.0.43" in problem
    assert "(and 5 more engines)" in problem
    # ONNX Runtime on the GPU still runs the folder's fp8 ONNX: it loads, through that
    assert e["loads"] and e["use"] == {"backend": "onnxruntime", "device": "cuda"}
    no_ort = machine(OrtFacts(), ("NVIDIA H100", (9, 0)), "10.8.0.43")
    fix = report(no_ort, path)["engines"]["fix"]
    assert fix == rebuild_hint(
        {"variant": "tiny", "precision": "fp8", "backend": "tensorrt"}, out=path
    )


def test_fp8_tensorrt_folder_on_orin_rebuilds_int8(tmp_path):
    path = folder(tmp_path, "fp8", "tensorrt", trt="10.3.0", sm="9.0")  # Orin's TensorRT
    data = report(ORIN, path)
    e = data["engines"]
    trt = verdicts(data)[("tensorrt", "cuda")]["problems"]
    assert "'fp8' needs SM 8.9+" in trt[0] and "Jetson Orin" in trt[0]
    assert any("compute capability 9.0" in p and "8.7" in p for p in trt)
    assert "FP8 Q/DQ graphs need onnxruntime >= 1.32" in str(e["verdicts"])
    assert not e["loads"] and not data["ok"]
    assert e["fix"].endswith("--precision int8 --backend tensorrt --force")
    assert "Jetson AGX Orin" in format_text(data) and "WILL NOT LOAD" in format_text(data)


def test_tensorrt_folder_on_a_machine_without_tensorrt(tmp_path):
    path = folder(tmp_path, "fp16", "tensorrt", trt="10.8.0", sm="8.9")
    data = report(CPU, path)
    trt = verdicts(data)[("tensorrt", "cuda")]["problems"]
    assert any("TensorRT is not installed" in p and "blip3o-edge[trt]" in p for p in trt)
    assert any("no CUDA GPU is visible" in p for p in trt)
    assert data["engines"]["use"] == {"backend": "onnxruntime", "device": "cpu"}  # its ONNX


def test_onnxruntime_folder_on_a_tensorrt_machine_says_how_to_build_engines(tmp_path):
    e = report(H100, folder(tmp_path))["engines"]
    trt = verdicts({"engines": e})[("tensorrt", "cuda")]["problems"]
    assert "no TensorRT engines" in trt[0] and "--precision fp32 --backend tensorrt" in trt[0]
    assert e["use"] == {"backend": "onnxruntime", "device": "cuda"}


@pytest.mark.parametrize(
    "ort, words",
    [
        (OrtFacts(), ["no onnxruntime is installed", "blip3o-edge[cpu]", "blip3o-edge[gpu]"]),
        (
            OrtFacts((("onnxruntime", "1.32.0"), ("onnxruntime-gpu", "1.23.0")), "1.23.0"),
            ["installed together", "pip uninstall -y onnxruntime onnxruntime-gpu"],
        ),
        (
            OrtFacts((("onnxruntime-gpu", "1.23.0"),), error="ImportError: libcudnn.so.9"),
            ["`import onnxruntime` fails", "--force-reinstall onnxruntime-gpu"],
        ),
    ],
)
def test_onnxruntime_install_problems(tmp_path, ort, words):
    data = report(machine(ort), folder(tmp_path))
    assert not data["ok"] and len(data["problems"]) == 1
    for word in words:
        assert word in data["problems"][0]


def test_no_onnxruntime_fix_is_the_install_not_a_rebuild(tmp_path):
    e = report(machine(OrtFacts()), folder(tmp_path))["engines"]
    assert not e["loads"] and e["fix"].startswith("no onnxruntime is installed")


def test_a_tensorrt_only_install_is_not_a_problem(tmp_path):
    trt_only = machine(OrtFacts(), ("NVIDIA L4", (8, 9)), "10.8.0.43")
    data = report(trt_only, folder(tmp_path, "fp8", "tensorrt", trt="10.8.0", sm="8.9"))
    assert data["problems"] == [] and data["ok"]
    assert data["engines"]["use"] == {"backend": "tensorrt", "device": "cuda"}
    cpu = verdicts(data)[("onnxruntime", "cpu")]
    assert "no onnxruntime is installed" in cpu["problems"][0]


def test_missing_files_and_unreadable_folders(tmp_path):
    path = folder(tmp_path)
    (path / "dit_step.fp32.onnx").unlink()
    e = report(CPU, path)["engines"]
    assert not e["loads"] and "dit_step.fp32.onnx" in str(e["verdicts"])
    assert f"--out {path}" in str(e["verdicts"])
    (path / "manifest.json").write_text("{")
    e = report(CPU, path)["engines"]
    assert not e["loads"] and "not valid JSON" in e["problems"][0]
    assert "does not exist" in report(CPU, tmp_path / "nope")["engines"]["problems"][0]


@pytest.mark.parametrize(
    "facts, trt_pick, buildable",
    [(CPU, "fp8", False), (H100, "fp8", True), (T4, "fp16", False), (ORIN, "int8", True)],
)
def test_precision_auto_is_the_exporters_decision(facts, trt_pick, buildable, monkeypatch):
    choices = build_choices(facts)
    assert choices["onnxruntime"]["precision"] == "fp32"
    assert choices["tensorrt"]["precision"] == trt_pick
    assert choices["tensorrt"]["buildable"] is buildable
    # the exporter resolves --precision auto with the same function, on the same SM
    from export import trt_build
    from export.build_plan import BuildRequest, resolve

    monkeypatch.setattr(trt_build, "compute_capability", lambda *a: facts.sm)
    request = BuildRequest(variant="tiny", backend="tensorrt", dry_run=True)
    assert resolve(request)[0] == trt_pick


def test_text_and_json_views(tmp_path):
    data = report(H100, folder(tmp_path, "fp8", "tensorrt", trt="10.8.0", sm="9.0"))
    assert json.loads(json.dumps(data)) == data
    assert data["machine"]["sm"] == "9.0" and data["machine"]["tensorrt"] == "10.8.0.43"
    text = format_text(data)
    for line in ("NVIDIA H100 80GB HBM3, SM 9.0", "570.86.15", "FP8 tensor cores", "loads here"):
        assert line in text


def test_rebuild_hint_names_the_weights_and_the_folder(tmp_path):
    m = {"variant": "4b", "precision": "fp16", "checkpoint": {"path": "/models/BLIP3o 4B"}}
    assert rebuild_hint(m) == (
        "python export/build_engines.py --variant 4b --checkpoint '/models/BLIP3o 4B' "
        "--precision fp16 --force"
    )
    m = {"variant": "8b", "precision": "fp8", "checkpoint": {"hash": "random-weights-seed-3"}}
    assert rebuild_hint(m, precision="int8", backend="tensorrt", out=tmp_path) == (
        "python export/build_engines.py --variant 8b --random-weights --seed 3 --precision int8 "
        f"--backend tensorrt --out {tmp_path} --force"
    )
    tiny = {"variant": "tiny", "precision": "fp32", "checkpoint": {"path": "/repo/checkpoints"}}
    assert "--checkpoint" not in rebuild_hint(tiny)  # tiny defaults to the shipped checkpoint


def test_generator_asks_the_same_rules_before_opening(tmp_path, tiny_engine_dir):
    import shutil

    from runtime.errors import UserError
    from runtime.generator import Generator

    path = tmp_path / "tiny-bf16"  # a real folder whose manifest says bf16
    shutil.copytree(tiny_engine_dir, path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "precision": "bf16"}))
    with pytest.raises(UserError, match="bf16 graphs do not run on ONNX Runtime's CPU"):
        Generator.from_dir(path, verify="none")
    with pytest.raises(UserError, match=r"unknown device 'npu'; valid: cpu, cuda, tensorrt"):
        Generator.from_dir(path, device="npu", verify="none")
    assert compat.ort_problems("fp32", "cuda", CPU_ORT)  # the CPU package has no CUDA provider


def test_probe_parsers():
    smi = "0, NVIDIA H200, 9.0, 140000, 143771, 570.86.15\n1, Orin, [N/A], [N/A], [N/A], [N/A]\n"
    gpus, driver = probe.parse_nvidia_smi(smi)
    assert gpus == [Gpu("NVIDIA H200", (9, 0), 140000, 143771), Gpu("Orin", None, None, None)]
    assert driver == "570.86.15"
    assert probe.parse_nvidia_smi("garbage") == ([], None)
    release = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64"
    assert probe.parse_tegra_release(release) == "R36.4.3"
    assert probe.parse_tegra_release("") is None
    assert probe.mem_available_mib("MemTotal: 6000 kB\nMemAvailable:  4194304 kB\n") == 4096


def test_probing_this_machine_never_fails(monkeypatch):
    facts = probe.machine_facts()
    assert facts.python and facts.numpy and json.dumps(facts.to_dict())
    monkeypatch.setattr(probe, "_version", lambda dist: "1.0" if dist.startswith("onnx") else None)
    assert len(probe.ort_facts().distributions) == sum(
        d.startswith("onnx") for d in probe.ORT_DISTRIBUTIONS
    )
