"""python -m runtime: writes an image, prints an answer, fails with one line on bad input, and
`doctor` judges a folder; the console scripts of pyproject.toml run the same mains."""

import importlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from runtime.errors import UserError

REPO = Path(__file__).resolve().parents[1]


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
    fast = run("generate", "a", "--engines", str(tiny_engine_dir), "--out", "f.png", "--preset",
               "fast", "--sampler", "heun", "--steps", "2", "-q", cwd=tmp_path)  # fmt: skip
    assert fast.returncode == 0 and (tmp_path / "f.png").is_file(), fast.stderr


def test_user_errors_exit_2_with_one_line(tiny_engine_dir, tmp_path):
    cases = [
        ("generate", "", "--engines", str(tiny_engine_dir)),
        ("generate", "a", "--steps", "0", "--engines", str(tiny_engine_dir)),
        ("generate", "a", "--engines", str(tmp_path / "missing")),
        ("answer", "nope.png", "q", "--engines", str(tiny_engine_dir)),
        ("generate", "a", "--decoder-sampler", "ddim", "--engines", str(tiny_engine_dir)),
        ("generate", "a", "--preset", "turbo", "--engines", str(tiny_engine_dir)),
    ]
    for args in cases:
        out = run(*args, "-q", cwd=tmp_path)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
        assert "Traceback" not in out.stderr


def console_scripts() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def entry_point(target: str):
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def test_console_scripts_run_the_documented_mains(capsys):
    scripts = console_scripts()
    assert set(scripts) == {"blip3o", "blip3o-build"}
    blip3o = entry_point(scripts["blip3o"])
    assert blip3o(["doctor", "--json"]) in (0, 1)  # 1 when this machine lacks something
    data = json.loads(capsys.readouterr().out)
    assert data["machine"]["python"] == platform.python_version()
    assert data["precision_auto"]["onnxruntime"]["precision"] == "fp32"
    build = entry_point(scripts["blip3o-build"])
    with pytest.raises(SystemExit) as exit_:
        build(["--help"])
    assert exit_.value.code == 0 and "--precision" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        blip3o(["generate", "a", "--backend", "coreml"])
    assert exit_.value.code == 2  # argparse: a one-line usage error


def test_installed_console_script_when_present(tmp_path):
    script = Path(sys.executable).with_name("blip3o")
    if not script.exists():
        pytest.skip("blip3o-edge's scripts are not installed in this venv")
    out = subprocess.run([str(script), "doctor"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode in (0, 1) and "export --precision auto" in out.stdout, out.stderr


def test_doctor_judges_a_built_folder(tiny_engine_dir, tmp_path):
    out = run("doctor", "--engines", str(tiny_engine_dir), "--json", cwd=tmp_path)
    engines = json.loads(out.stdout)["engines"]
    assert engines["loads"] and engines["use"] == {"backend": "onnxruntime", "device": "cpu"}
    assert out.returncode == 0, out.stdout
    text = run("doctor", "--engines", str(tmp_path / "missing"), cwd=tmp_path)
    assert text.returncode == 1 and "WILL NOT LOAD" in text.stdout


def test_without_onnxruntime_generate_fails_in_one_line_naming_the_extras(
    tiny_engine_dir, monkeypatch, capsys
):
    from runtime import cli
    from runtime.machine import probe

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails, as when absent
    monkeypatch.setattr(probe, "_version", lambda dist: None)  # and no distribution installed
    assert cli.main(["generate", "a", "--engines", str(tiny_engine_dir), "-q"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no onnxruntime is installed" in lines[0]
    assert "blip3o-edge[cpu]" in lines[0] and "blip3o-edge[gpu]" in lines[0]
    monkeypatch.delitem(sys.modules, "runtime.sessions.onnxruntime", raising=False)
    with pytest.raises(UserError, match=r"needs ONNX Runtime.*blip3o-edge\[cpu\]"):
        importlib.import_module("runtime.sessions.onnxruntime")
    assert importlib.import_module("runtime.machine.doctor")  # doctor itself needs no onnxruntime


def test_an_image_says_its_seed_and_carries_what_remakes_it(tiny_engine_dir, tmp_path, capsys):
    """The output line names the seed; the PNG's text chunks hold the prompt, every sampler
    setting and the folder, and the params read back from them draw the same image."""
    from runtime import Generator
    from runtime.cli import main
    from runtime.jobs.provenance import params_of_info

    out = tmp_path / "a.png"
    argv = ["generate", "a blue square", "--engines", str(tiny_engine_dir), "--out", str(out)]
    assert main([*argv, "--seed", "7", "--steps", "2", "--decoder-steps", "2", "-q"]) == 0
    assert capsys.readouterr().out == f"{out}\tseed=7\n"
    info = Image.open(out).text
    assert info["prompt"] == "a blue square" and info["seed"] == "7"
    assert info["engines"] == str(tiny_engine_dir) and info["Software"].startswith("blip3o-edge")
    params = params_of_info(info)
    assert (params.steps, params.decoder_steps, params.preset) == (2, 2, None)
    assert params.guidance is not None and params.decoder_sampler is not None  # resolved
    with Generator.from_dir(tiny_engine_dir) as gen:
        again = gen.generate(info["prompt"], params)[0]
    assert list(again.getdata()) == list(Image.open(out).convert("RGB").getdata())


def test_answer_takes_the_answer_params_as_options(tiny_engine_dir, capsys):
    """`answer`'s options are AnswerParams' fields; a bad one is one line, before any work."""
    from runtime.cli import build_parser, main
    from runtime.params import AnswerParams, settings_of

    answer = build_parser()._subparsers._group_actions[0].choices["answer"]
    options = {a.dest for a in answer._actions if a.option_strings}
    assert set(settings_of(AnswerParams)) <= options
    code = main(["answer", "x.png", "q", "--engines", str(tiny_engine_dir), "--top-p", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: top_p must be a finite number in [0, 1], got 2.0\n"


def test_version_and_help_ranges_from_the_folder(tiny_engine_dir, capsys):
    from runtime import __version__
    from runtime.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"blip3o-edge {__version__}\n"
    with pytest.raises(SystemExit):
        main(["generate", "--help", "--engines", str(tiny_engine_dir)])
    text = " ".join(capsys.readouterr().out.split())
    assert "images per prompt, one batch, in [1, 4]" in text  # the folder's batch, not 1024
    assert "(default: $BLIP3O_ENGINES, else" in text
