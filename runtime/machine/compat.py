"""Will an engine folder load on this machine, and if not, what fixes it: rules over facts.

Every rule here is a function of a manifest and a `runtime.machine.probe.Facts` (plain data), so the
verdicts `doctor` prints are tested with faked GPUs, and `Generator` asks the same rules before it
opens an ONNX Runtime session (a missing onnxruntime, a provider the install lacks or a bf16
folder on CPU become one-line errors instead of ORT's). The TensorRT rules reuse the session's
own check (`runtime.sessions.tensorrt.check_engine_compat`); the precision rules are
`runtime.machine.hardware`'s, shared with the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UserError
from runtime.folder.manifest import EngineFolderError, rebuild_hint
from runtime.machine.hardware import auto_precision, resolve_precision, sm_text, supports
from runtime.machine.probe import Facts, OrtFacts
from runtime.sessions.tensorrt import check_engine_compat

# The ONNX Runtime execution providers each runtime device needs, in preference order.
DEVICE_PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
INSTALL_ORT = (
    "install exactly one ONNX Runtime: pip install 'blip3o-edge[cpu]' (CPU) or "
    "'blip3o-edge[gpu]' (CUDA, onnxruntime-gpu); on a Jetson, the onnxruntime-gpu wheel built "
    "for its JetPack"
)
INSTALL_TRT = (
    "pip install 'blip3o-edge[trt]' (tensorrt + cuda-python); on a Jetson, JetPack's TensorRT "
    "(a venv made with --system-site-packages) plus pip install cuda-python"
)
FP8_CPU_MIN_ORT = (1, 32)
# Where to run a folder, best first: its own backend, then ONNX Runtime on the GPU, then CPU.
CANDIDATES = (("tensorrt", "cuda"), ("onnxruntime", "cuda"), ("onnxruntime", "cpu"))


@dataclass(frozen=True)
class Verdict:
    backend: str
    device: str
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def environment_problems(ort: OrtFacts) -> list[str]:
    """What is wrong with the installed onnxruntime itself (none, two, or broken)."""
    names = [name for name, _ in ort.distributions]
    if len(names) > 1:
        listed = " and ".join(f"{n} {v}" for n, v in ort.distributions)
        return [
            f"{listed} are installed together: they share the `onnxruntime` module, so the one "
            f"installed last wins; pip uninstall -y {' '.join(names)}, then {INSTALL_ORT}"
        ]
    if ort.version is None:
        if not names:
            return [f"no onnxruntime is installed; {INSTALL_ORT}"]
        return [
            f"{names[0]} is installed but `import onnxruntime` fails ({ort.error}); "
            f"pip install --force-reinstall {names[0]}"
        ]
    return []


def ort_problems(precision: str, device: str, ort: OrtFacts) -> list[str]:
    """Why an ONNX Runtime session of this precision cannot open on `device` with this install
    (empty: it can, as far as the install goes; GPU facts are `gpu_problems`)."""
    if ort.version is None:
        return environment_problems(ort)[:1]
    if device not in DEVICE_PROVIDERS:
        return [f"unknown device {device!r}; valid: {', '.join(DEVICE_PROVIDERS)}"]
    wanted = DEVICE_PROVIDERS[device][0]
    if wanted not in ort.providers:
        dist = " ".join(f"{n} {v}" for n, v in ort.distributions) or f"onnxruntime {ort.version}"
        return [
            f"device {device!r} needs onnxruntime's {wanted}, which this install ({dist}) lacks "
            f"(it has {', '.join(ort.providers)}); uninstall it and pip install "
            f"'blip3o-edge[gpu]', or use device 'cpu'"
        ]
    if device == "cpu" and precision == "bf16":
        return [
            "bf16 graphs do not run on ONNX Runtime's CPU provider (it has no bf16 kernel for "
            "ops such as Where); run them on an SM 8.0+ GPU, or use an fp32/fp16 folder"
        ]
    if device == "cpu" and precision == "fp8" and _version(ort.version) < FP8_CPU_MIN_ORT:
        return [
            f"FP8 Q/DQ graphs need onnxruntime >= {'.'.join(map(str, FP8_CPU_MIN_ORT))} on CPU, "
            f"this is {ort.version}; upgrade it, or use an int8 folder"
        ]
    return []


def check_onnxruntime(precision: str, device: str, ort: OrtFacts) -> None:
    """Raise the first `ort_problems` as a UserError (what `Generator` does before opening)."""
    if problems := ort_problems(precision, device, ort):
        raise UserError(problems[0])


def gpu_problems(precision: str, facts: Facts) -> list[str]:
    """Why this machine's GPU cannot run `precision` (or why there is no GPU to ask)."""
    if not facts.gpus:
        return ["no CUDA GPU is visible (no nvidia-smi, no CUDA driver library)"]
    if facts.sm is None:
        return [f"{facts.gpus[0].name} reports no compute capability"]
    try:
        resolve_precision(precision, facts.sm)
    except UserError as err:
        return [str(err)]
    return []


def tensorrt_problems(manifest: dict, facts: Facts) -> list[str]:
    """Why the folder's TensorRT engines will not load here."""
    engines = [e for e in manifest.get("graphs", {}).values() if e.get("engine")]
    if not engines:
        return [f"it has no TensorRT engines; build them with: {_tensorrt_hint(manifest, facts)}"]
    problems = []
    if facts.tensorrt is None:
        problems.append(f"TensorRT is not installed: {INSTALL_TRT}")
    if facts.cuda_python is None:
        problems.append("cuda-python is not installed: pip install 'cuda-python>=12'")
    problems += gpu_problems(manifest["precision"], facts)
    if facts.sm is None:
        return problems
    fixed = {**manifest, "precision": _tensorrt_precision(manifest, facts.sm)}
    if facts.tensorrt is not None:
        failures = []
        for entry in engines:
            try:
                check_engine_compat(entry, facts.tensorrt, facts.sm, fixed)
            except EngineFolderError as err:
                failures.append(str(err))
        if failures:
            more = f" (and {len(failures) - 1} more engines)" if len(failures) > 1 else ""
            problems.append(failures[0] + more)
    elif (built := manifest.get("compute_capability")) and built != sm_text(facts.sm):
        problems.append(
            f"its engines were built for compute capability {built}, this GPU has "
            f"{sm_text(facts.sm)}; rebuild with: {rebuild_hint(fixed)}"
        )
    return problems


def missing_files(folder: Path, manifest: dict, backend: str) -> list[str]:
    """Files the manifest lists for `backend` that are not in the folder (no hashing)."""
    if "host" not in manifest:
        return ["(the build did not finish: the manifest has no host assets)"]
    entries = list(manifest["host"].values())
    for graph in manifest["graphs"].values():
        if backend == "tensorrt":
            entries.append(graph.get("engine") or {})
        else:
            entries += [graph, *graph.get("external_data", [])]
    files = [e["file"] for e in entries if e.get("file")]
    return [f for f in files if not (folder / f).is_file()]


def folder_verdicts(folder: Path, manifest: dict, facts: Facts) -> list[Verdict]:
    """One verdict per place the folder could run here, best first."""
    verdicts = []
    for backend, device in CANDIDATES:
        if backend == "tensorrt" and manifest.get("backend") != "tensorrt" and not facts.tensorrt:
            continue  # an ONNX Runtime folder on a machine without TensorRT: not a candidate
        if backend == "tensorrt":
            problems = tensorrt_problems(manifest, facts)
        else:
            problems = ort_problems(manifest["precision"], device, facts.ort)
            if device != "cpu" and not problems:
                problems = gpu_problems(manifest["precision"], facts)
        if not problems and (missing := missing_files(folder, manifest, backend)):
            problems = [
                f"{len(missing)} listed file(s) are missing (first: {missing[0]}); rebuild "
                f"with: {rebuild_hint(manifest, out=folder)}"
            ]
        verdicts.append(Verdict(backend, device, tuple(problems)))
    return verdicts


def fix_command(folder: Path, manifest: dict, facts: Facts) -> str:
    """What to run so that the folder (or a rebuilt one) loads here: an install when ONNX
    Runtime is missing or broken, else the build command for a backend and precision this
    machine runs."""
    if manifest.get("backend") == "tensorrt" and facts.tensorrt and facts.sm:
        precision = _tensorrt_precision(manifest, facts.sm)
        out = folder if precision == manifest["precision"] else None
        return rebuild_hint(manifest, precision=precision, backend="tensorrt", out=out)
    if env := environment_problems(facts.ort):
        return env[0]
    precision = manifest["precision"]
    if ort_problems(precision, "cpu", facts.ort) and (
        ort_problems(precision, "cuda", facts.ort) or gpu_problems(precision, facts)
    ):
        precision = auto_precision("onnxruntime", facts.sm)[0]
    out = folder if precision == manifest["precision"] else None
    return rebuild_hint(manifest, precision=precision, backend="onnxruntime", out=out)


def _tensorrt_precision(manifest: dict, sm: tuple[int, int]) -> str:
    precision = manifest["precision"]
    return precision if supports(precision, sm) else auto_precision("tensorrt", sm)[0]


def _tensorrt_hint(manifest: dict, facts: Facts) -> str:
    precision = _tensorrt_precision(manifest, facts.sm) if facts.sm else manifest["precision"]
    return rebuild_hint(manifest, precision=precision, backend="tensorrt")


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)
