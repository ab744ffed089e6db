"""python -m runtime: writes an image, prints an answer, and fails with one line on bad input."""

import subprocess
import sys

from PIL import Image


def run(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args], capture_output=True, text=True, cwd=cwd
    )


def test_generate_then_answer(tiny_engine_dir, tmp_path):
    out = run(
        "generate",
        "a red circle",
        "--engines",
        str(tiny_engine_dir),
        "--out",
        "img.png",
        "--steps",
        "3",
        "--decoder-steps",
        "3",
        "--timings",
        "-q",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "img.png").size == (64, 64)
    assert "unet" in out.stdout and "total" in out.stdout
    ans = run(
        "answer",
        "img.png",
        "Describe the image.",
        "--engines",
        str(tiny_engine_dir),
        "--max-new-tokens",
        "4",
        "-q",
        cwd=tmp_path,
    )
    assert ans.returncode == 0 and ans.stdout.endswith("\n"), ans.stderr  # random weights: any text
    many = run(
        "generate",
        "a",
        "--engines",
        str(tiny_engine_dir),
        "--out",
        "m.png",
        "--num-images",
        "2",
        "--steps",
        "1",
        "--decoder-steps",
        "1",
        "-q",
        cwd=tmp_path,
    )
    assert many.returncode == 0 and (tmp_path / "m-1.png").is_file()


def test_user_errors_exit_2_with_one_line(tiny_engine_dir, tmp_path):
    cases = [
        ("generate", "", "--engines", str(tiny_engine_dir)),
        ("generate", "a", "--steps", "0", "--engines", str(tiny_engine_dir)),
        ("generate", "a", "--engines", str(tmp_path / "missing")),
        ("answer", "nope.png", "q", "--engines", str(tiny_engine_dir)),
    ]
    for args in cases:
        out = run(*args, "-q", cwd=tmp_path)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
        assert "Traceback" not in out.stderr
