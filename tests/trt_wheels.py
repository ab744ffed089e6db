"""The real TensorRT and CUDA bindings the conformance tests check against, one folder each.

    python tests/trt_wheels.py          # install what is missing under .cache/trt/ (CI does)

Each target is installed with `pip install --no-deps --target .cache/trt/<name>` and imported
only in subprocesses (`tests/trt_probe.py`), never into the test process: two TensorRT versions
and two cuda-python majors cannot share one interpreter. The set is the smallest that covers the
oldest and newest versions we support: TensorRT 10.3 (JetPack 6) and 11.4, cuda-python 12 and 13.
PyPI's lean runtime libraries start at 10.15 as binary wheels; the 10.3 bindings (the Python API
we check) load against them (same `libnvinfer_lean.so.10`). The builder bindings cannot load
without libnvinfer: only their shared library's strings are read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / ".cache" / "trt"
OLDEST, NEWEST = "10.3.0", "11.4.0.106"
LEAN = "tensorrt-lean-cu12"
TARGETS = {
    "trt-lean-10.3": [f"{LEAN}-bindings=={OLDEST}", f"{LEAN}-libs==10.15.1.29"],
    "trt-lean-11.4": [f"{LEAN}-bindings=={NEWEST}", f"{LEAN}-libs=={NEWEST}"],
    "trt-builder-10.3": [f"tensorrt-cu12-bindings=={OLDEST}"],
    "trt-builder-11.4": [f"tensorrt-cu12-bindings=={NEWEST}"],
    "cuda-12": ["cuda-bindings==12.9.4", "cuda-pathfinder==1.9.1"],
    "cuda-13": ["cuda-bindings==13.4.4", "cuda-pathfinder==1.9.1"],
}  # fmt: skip
DONE = ".installed"


def target(name: str) -> Path:
    return ROOT / name


def installed(name: str) -> bool:
    return (
        (target(name) / DONE).read_text().split() == TARGETS[name]
        if (target(name) / DONE).is_file()
        else False
    )


def install(name: str) -> Path:
    """Install one target (no-op when its marker lists the same requirements)."""
    path = target(name)
    ROOT.parent.mkdir(parents=True, exist_ok=True)
    (ROOT.parent / ".gitignore").write_text("*\n")  # as a venv does: never committed
    if installed(name):
        return path
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:",
           "--upgrade", "--target", str(path), *TARGETS[name]]  # fmt: skip
    subprocess.run(cmd, check=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (path / DONE).write_text("\n".join(TARGETS[name]) + "\n")
    return path


def builder_library(name: str) -> Path:
    """The builder bindings' shared library of a target (`tensorrt_bindings/tensorrt.so`)."""
    found = sorted(target(name).glob("tensorrt_bindings/tensorrt*.so"))
    if not found:
        raise FileNotFoundError(f"no tensorrt_bindings/tensorrt*.so under {target(name)}")
    return found[0]


if __name__ == "__main__":
    for name in TARGETS:
        print(f"{name}: {install(name)}", flush=True)
