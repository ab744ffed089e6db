"""`python -m runtime doctor`: what this machine has, what the exporter picks, what will load.

On a new GPU server or Jetson board the questions are always the same: which ONNX Runtime is
installed (and is it only one), which execution providers and GPU it sees, which TensorRT, what
`--precision auto` builds here and why, and whether a given engine folder will load here, with
the command that rebuilds it when it will not. `report` answers them as one plain dict (the
`--json` output) from a `runtime.machine.probe.Facts`, so tests fake any machine; `format_text`
is the human-readable view. The decisions are `runtime.machine.hardware`'s and
`runtime.machine.compat`'s, the ones the
exporter and `Generator` use: nothing here decides on its own. Torch-free, like all of runtime.
"""

from __future__ import annotations

from pathlib import Path

from runtime.folder.manifest import EngineFolderError, load_manifest
from runtime.machine.compat import environment_problems, fix_command, folder_verdicts
from runtime.machine.hardware import BUILD_BACKENDS, auto_precision
from runtime.machine.probe import Facts


def build_choices(facts: Facts) -> dict:
    """{backend: {precision, reason, buildable here, why not}} for `--precision auto`."""
    choices = {}
    for backend in BUILD_BACKENDS:
        precision, reason = auto_precision(backend, facts.sm)
        blockers = []
        if backend == "tensorrt":
            if facts.tensorrt is None:
                blockers.append(
                    "TensorRT is not installed (the `trt` extra; JetPack's on a Jetson)"
                )
            if facts.sm is None:
                blockers.append("no CUDA GPU is visible")
        elif facts.ort.version is None:
            blockers.append("no working onnxruntime (the exporter checks every graph with it)")
        choices[backend] = {
            "precision": precision,
            "reason": reason,
            "buildable": not blockers,
            "blockers": blockers,
        }
    return choices


def folder_report(folder: Path, facts: Facts) -> dict:
    """Whether the engine folder loads here: per backend/device verdicts, the best place to run
    it, and the fix when it runs nowhere."""
    try:
        manifest = load_manifest(folder)
    except EngineFolderError as err:
        return {"path": str(folder), "loads": False, "problems": [str(err)], "verdicts": []}
    verdicts = folder_verdicts(folder, manifest, facts)
    best = next((v for v in verdicts if v.ok), None)
    built = {
        "variant": manifest["variant"],
        "precision": manifest["precision"],
        "backend": manifest.get("backend", "onnxruntime"),
        "tensorrt": manifest.get("tensorrt"),
        "compute_capability": manifest.get("compute_capability"),
    }
    return {
        "path": str(folder),
        "built_for": built,
        "loads": best is not None,
        "use": None if best is None else {"backend": best.backend, "device": best.device},
        "run": None if best is None else _run_command(folder, best.backend, best.device),
        "fix": None if best is not None else fix_command(folder, manifest, facts),
        "verdicts": [
            {"backend": v.backend, "device": v.device, "ok": v.ok, "problems": list(v.problems)}
            for v in verdicts
        ],
    }


def report(facts: Facts, engines: Path | None = None) -> dict:
    """Everything doctor says, as JSON-ready data; `ok` is False when something needs fixing."""
    problems = environment_problems(facts.ort)
    if facts.tensorrt and not facts.ort.distributions:
        problems = []  # a TensorRT-only install (the `trt` extra alone) is a valid choice
    data = {
        "machine": facts.to_dict(),
        "problems": problems,
        "precision_auto": build_choices(facts),
    }
    data["engines"] = None if engines is None else folder_report(Path(engines), facts)
    data["ok"] = not data["problems"] and (engines is None or data["engines"]["loads"])
    return data


def _run_command(folder: Path, backend: str, device: str) -> str:
    cmd = f'python -m runtime generate "a red circle" --engines {folder}'
    if backend != "onnxruntime":
        cmd += f" --backend {backend}"
    return cmd + (f" --device {device}" if device != "cpu" else "")


def format_text(data: dict) -> str:
    """The report as aligned lines for a terminal."""
    m, lines = data["machine"], []

    def row(key: str, value) -> None:
        lines.append(f"  {key:<22} {value if value not in (None, '') else '-'}")

    lines.append("machine")
    row("python", f"{m['python']} ({m['platform']})")
    row("numpy", m["numpy"])
    dists = ", ".join(f"{n} {v}" for n, v in m["ort"]["distributions"].items())
    row("onnxruntime", dists or "not installed")
    row("execution providers", ", ".join(m["ort"]["providers"]) or m["ort"]["error"])
    row("NVIDIA driver / CUDA", f"{m['driver'] or '-'} / {m['cuda'] or '-'}")
    for i, g in enumerate(m["gpus"]):
        cap = ".".join(map(str, g["compute_capability"])) if g["compute_capability"] else "?"
        free = f"{g['memory_free_mib']} MiB free" if g["memory_free_mib"] is not None else ""
        total = f" of {g['memory_total_mib']} MiB" if g["memory_total_mib"] is not None else ""
        source = f" (from {m['gpu_source']})" if m["gpu_source"] else ""
        row(f"gpu {i}", f"{g['name']}, SM {cap}, {free or 'free memory ?'}{total}{source}")
    if not m["gpus"]:
        row("gpu", "none visible")
    row("tensorrt", m["tensorrt"] or "not installed")
    row("cuda-python", m["cuda_python"] or "not installed")
    if m["jetson"]:
        row("jetson", f"{m['jetson']} (L4T {m['l4t'] or '?'})")
    for problem in data["problems"]:
        lines.append(f"  PROBLEM: {problem}")
    lines.append("export --precision auto")
    for backend, c in data["precision_auto"].items():
        lines.append(f"  {backend:<22} {c['precision']}: {c['reason']}")
        if not c["buildable"]:
            lines.append(f"  {'':<22} cannot build here: {'; '.join(c['blockers'])}")
    if data["engines"] is not None:
        lines += _format_folder(data["engines"])
    return "\n".join(lines)


def _format_folder(e: dict) -> list[str]:
    lines = [f"engine folder {e['path']}"]
    if "built_for" in e:
        b = e["built_for"]
        trt = f", TensorRT {b['tensorrt']}" if b["tensorrt"] else ""
        sm = f", SM {b['compute_capability']}" if b["compute_capability"] else ""
        built = f"{b['variant']}-{b['precision']}, {b['backend']}{trt}{sm}"
        lines.append(f"  {'built for':<22} {built}")
    for problem in e.get("problems", []):
        lines.append(f"  PROBLEM: {problem}")
    for v in e["verdicts"]:
        status = "loads" if v["ok"] else "no: " + "; ".join(v["problems"])
        lines.append(f"  {v['backend'] + ' / ' + v['device']:<22} {status}")
    if e["loads"]:
        lines.append(f"  {'verdict':<22} loads here; run: {e['run']}")
    else:
        fix = f"; fix: {e['fix']}" if e.get("fix") else ""
        lines.append(f"  {'verdict':<22} WILL NOT LOAD here{fix}")
    return lines
