"""The C++ embedding (runtime/cpp): build the example with CMake, run it on the tiny engines.

The example is compiled against the interpreter running the tests (`sys.executable`), so the
embedded Python is this one; the environment passed to it points that interpreter at the repo
and this venv's site-packages, as a host application would.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CPP_DIR = REPO / "runtime" / "cpp"
PROMPT, QUESTION = "a red circle", "Describe the image."

CMAKE = shutil.which("cmake")
CXX = next(
    (c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CMAKE is None, reason="cmake is not on PATH"),
    pytest.mark.skipif(CXX is None, reason="no C++ compiler (c++, g++, clang++ or $CXX)"),
]


def embedded_env(*, via_python_path: bool = False) -> dict[str, str]:
    """Environment under which the example's interpreter imports `runtime` from this venv.

    PYTHONHOME is the base installation (a venv's python only links against it), so the stdlib
    is found even when libpython was built for another prefix. The repo and site-packages go
    either in PYTHONPATH or in BLIP3O_PYTHON_PATH, which the example hands to the Generator's
    `python_path` argument: the two ways a host can point the interpreter at a venv.
    """
    home = sys.base_prefix
    if sys.base_exec_prefix != sys.base_prefix:
        home += os.pathsep + sys.base_exec_prefix
    paths = os.pathsep.join([str(REPO), *site.getsitepackages()])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BLIP3O_PYTHON_PATH")}
    env["PYTHONHOME"] = home
    env["BLIP3O_PYTHON_PATH" if via_python_path else "PYTHONPATH"] = paths
    return env


@pytest.fixture(scope="module")
def example_build(tmp_path_factory):
    """Configure, then start compiling in the background: the compile (one core) overlaps the
    tiny engine build that the `example` fixture waits on next."""
    build = tmp_path_factory.mktemp("cpp_build")
    configure = subprocess.run(
        [CMAKE, "-S", str(CPP_DIR), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}"],
        capture_output=True,
        text=True,
        env={**os.environ, "CXX": shutil.which(CXX)},
    )
    assert configure.returncode == 0, (
        f"cmake configure failed:\n{configure.stdout}\n{configure.stderr}"
    )
    proc = subprocess.Popen(
        [CMAKE, "--build", str(build)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield build / "example", proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def example(example_build, tiny_engine_dir) -> Path:
    binary, proc = example_build
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"cmake --build failed:\n{log}"
    return binary


def run_example(binary: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(binary), *args], capture_output=True, text=True, env=env, timeout=120
    )


def read_ppm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    header = b"P6\n64 64\n255\n"  # the tiny decoder's 64x64 output, as example.cpp writes it
    assert data[: len(header)] == header, data[:20]
    assert len(data) == len(header) + 64 * 64 * 3
    return np.frombuffer(data[len(header) :], np.uint8).reshape(64, 64, 3)  # (H, W, 3)


def test_example_generates_and_answers(example, tiny_engine_dir, tmp_path):
    from runtime.generator import Generator

    out = tmp_path / "image.ppm"
    run = run_example(example, str(tiny_engine_dir), str(out), PROMPT, QUESTION, env=embedded_env())
    assert run.returncode == 0, run.stderr
    pixels = read_ppm(out)
    with Generator.from_dir(tiny_engine_dir) as gen:
        # Same seed, same sessions: the bytes that crossed into C++ are Python's image.
        expected = np.asarray(gen.generate(PROMPT, seed=0)[0].convert("RGB"))
        np.testing.assert_array_equal(pixels, expected)
        assert run.stdout == gen.answer(pixels, QUESTION) + "\n"


def test_example_reports_python_errors(example, tiny_engine_dir, tmp_path):
    from runtime.generator import Generator

    with Generator.from_dir(tiny_engine_dir) as gen, pytest.raises(ValueError) as err:
        gen.generate("", seed=0)
    out = tmp_path / "image.ppm"
    env = embedded_env(via_python_path=True)
    run = run_example(example, str(tiny_engine_dir), str(out), "", QUESTION, env=env)
    assert run.returncode != 0
    assert f"{type(err.value).__name__}: {err.value}" in run.stderr  # UserError: prompt is empty
    assert "Traceback" not in run.stderr
    assert not out.exists()
