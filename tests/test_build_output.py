"""What a build shows: one bar per stage, quantizer output in the log, warnings once, one-line
errors, the dry run's peak (export/build_log.py, export/build_engines.py, export/build_plan.py)."""

from __future__ import annotations

import io
import logging
import os
import re
import warnings

import numpy as np
import pytest
from tqdm import tqdm

from export import build_engines, build_log
from export.build_log import BuildLog, TerminalFilter
from export.build_plan import BuildRequest, build_threads


@pytest.fixture
def terminal_handler():
    """A root handler like the CLI's (each message once), into a buffer."""
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(TerminalFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


def _noisy_stage():
    """What a quantizer does while it runs: prints, C-level writes, its own logger, its own
    progress bar, and a warning that a library's `catch_warnings` makes Python repeat."""
    print("Collecting tensor data and making histogram ...")
    os.write(2, b"[W:onnxruntime] a C-level warning\n")
    logging.getLogger("modelopt.onnx").warning("a quantizer's own warning")
    for _ in tqdm(range(3), desc="a quantizer's bar"):
        pass
    for _ in range(3):
        with warnings.catch_warnings():  # resets the once-per-location registry, like torch
            warnings.simplefilter("default")
            warnings.warn("`LeafSpec` is deprecated", FutureWarning, stacklevel=1)


def test_stage_output_goes_to_the_log_and_warnings_are_said_once(tmp_path, capfd, terminal_handler):
    path = tmp_path / "tiny-int8.build.log"
    with BuildLog(path, progress=True) as out:
        with out.stage("export:dit_step") as line:
            _noisy_stage()
            line["postfix"] = "1.0 s"
        with out.stage("quantize:dit_step") as line:
            bar = build_log.progress(5, "sample", "quantizer")
            for _ in range(5):
                bar.update()
            line["postfix"] = "2.0 s"
        with out.stage("assets") as line:
            line["postfix"] = "up to date"
    err, said_once = capfd.readouterr().err, terminal_handler.stream.getvalue()
    text = path.read_text()
    for said in ("Collecting tensor data", "a C-level warning", "a quantizer's own warning",
                 "a quantizer's bar"):  # fmt: skip
        assert said in text and said not in err + said_once, said
    assert said_once.count("FutureWarning: `LeafSpec`") == 1  # said once on the terminal ...
    assert "(repeated 3 times)" in err and "FutureWarning: `LeafSpec`" in err  # ... then counted
    assert text.count("FutureWarning: `LeafSpec`") == 3  # the log has every one
    finals = [line for line in err.replace("\r", "\n").splitlines() if "100%" in line]
    assert any("export:dit_step" in f and "1.0 s" in f for f in finals)
    assert any("quantize:dit_step (quantizer)" in f and "5/5 sample" in f for f in finals)
    assert any(line.startswith("assets") and "up to date" in line for line in err.splitlines())
    assert build_log.active() is None  # and fd 1/2 are back: pytest still captures below
    print("after the build")
    assert "after the build" in capfd.readouterr().out


def test_no_bars_without_progress(tmp_path, capfd):
    with BuildLog(tmp_path / "x.build.log", progress=False) as out:
        with out.stage("export:vae_decoder"):
            build_log.progress(3, "call", "calibration").advance(3, 3, "vae_decoder")
    assert capfd.readouterr().err == ""


def test_progress_outside_a_build_does_nothing():
    bar = build_log.progress(3, "call", "calibration")
    bar.update()
    bar.advance(2, 3, "dit")


def test_the_log_sits_beside_the_folder(tmp_path):
    assert build_log.log_path(tmp_path / "engines" / "tiny-int8") == (
        tmp_path / "engines" / "tiny-int8.build.log"
    )


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--variant", "huge"], "argument --variant: invalid choice: 'huge'"),
        (["--variant", "tiny", "--calibration-steps", "3"], "expected 2 arguments"),
        (["--variant", "tiny", "--threads", "two"], "invalid int value: 'two'"),
    ],
)
def test_bad_arguments_are_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_engines.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: ") and says in err and "--help)" in err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--calibration-count", "0"], "calibration_count must be an integer >= 1, got 0"),
        (["--threads", "0"], "threads must be an integer >= 1"),
        (["--calibration-prompts", "/no/such/file"], "/no/such/file does not exist"),
        (["--static-batch", "2"], "needs --backend tensorrt"),
    ],
)
def test_errors_while_planning_are_one_line(argv, says, capsys, tmp_path):
    rc = build_engines.main(["--variant", "tiny", "--out", str(tmp_path / "e"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and says in err, err
    assert not (tmp_path / "e").exists()


def test_threads_are_pinned_for_tiny_and_given_back(tmp_path):
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )  # fmt: skip
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    before, real = torch.get_num_threads(), ort.InferenceSession
    with build_threads(BuildRequest(variant="tiny")) as threads:
        assert threads == 1 and torch.get_num_threads() == 1
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert session.get_session_options().intra_op_num_threads == 1
        assert session.run(None, {"x": np.array([-1, 2], np.float32)})[0].tolist() == [0, 2]
    assert torch.get_num_threads() == before and ort.InferenceSession is real
    with build_threads(BuildRequest(variant="4b")) as threads:
        assert threads is None and ort.InferenceSession is real
    with build_threads(BuildRequest(variant="4b", threads=3)) as threads:
        assert threads == 3 and torch.get_num_threads() == 3
    assert torch.get_num_threads() == before


def _peaks(plan: str) -> tuple[list[tuple[str, float]], float, str]:
    rows = re.findall(r"^  (\S+)\s+.*?\s([\d.]+) GB\s+[\d.]+ GB$", plan, re.M)
    head = re.search(r"peak host memory ([\d.]+) GB \((\S+)\)", plan)
    return [(s, float(gb)) for s, gb in rows], float(head[1]), head[2]


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_the_dry_runs_headline_is_the_largest_stage_peak(precision, capsys, tmp_path):
    """4b with random weights: the seeded pipeline (28.8 GB fp32) is held by every stage, so
    it is in every stage's peak and the headline is the largest of those (it said 19.4 GB for
    fp32 and 46.0 GB for int8, with the 28.8 GB only in a note)."""
    argv = ["--variant", "4b", "--random-weights", "--dry-run", "--precision", precision,
            "--out", str(tmp_path / "x")]  # fmt: skip
    assert build_engines.main(argv) == 0
    plan = capsys.readouterr().out
    rows, headline, stage = _peaks(plan)
    assert len(rows) >= 7 and headline == max(gb for _, gb in rows)
    assert (stage, headline) in rows
    assert all(gb > 28.8 for _, gb in rows)  # the held pipeline is in every peak
    assert "in each peak above" in plan
    if precision == "int8":
        assert "dit_step 256 of 960, unet_step 256 of 1,600" in plan
        assert "threads: torch and ONNX Runtime default" in plan


@pytest.mark.slow  # exports and quantizes two tiny graphs (~40 s)
def test_a_tiny_int8_build_shows_one_bar_per_stage_and_logs_the_quantizer(tmp_path, capfd):
    from runtime.folder.manifest import load_manifest

    out = tmp_path / "tiny-int8"
    argv = ["--variant", "tiny", "--precision", "int8", "--out", str(out), "--graphs",
            "dit_step", "vae_decoder", "--calibration-count", "2", "--calibration-steps", "2",
            "2", "--calibration-samples", "3"]  # fmt: skip
    assert build_engines.main(argv) == 0
    err = capfd.readouterr().err
    lines = err.replace("\r", "\n").splitlines()
    log = build_log.log_path(out)
    assert f"build log: {log}" in lines
    stages = ["assets", "negative", "export:dit_step", "quantize:dit_step", "export:vae_decoder",
              "quantize:vae_decoder"]  # fmt: skip
    for stage in stages:  # each bar's last state: full, with the stage's time and peak
        final = [ln for ln in lines if ln.startswith(stage + " ") and "100%" in ln]
        assert final and "peak RSS" in final[-1], (stage, err)
    calibration = [ln for ln in lines if ln.startswith("quantize:dit_step (calibration)")]
    assert calibration and re.search(r"prompt \d+/4", calibration[-1])  # 2 + 2 held out
    assert any(ln.startswith("quantize:dit_step (quantizer)") and "3/3 sample" in ln
               for ln in lines)  # fmt: skip
    text = log.read_text()
    for quantizer in ("Collecting tensor data", "Finding optimal threshold"):  # ORT's prints
        assert quantizer in text and quantizer not in err
    assert "torchvision is not installed" not in err  # torch.onnx's notices: the log's
    q = load_manifest(out)["graphs"]["dit_step"]["quantization"]
    assert q["calibration_samples"] == 3 and q["error_vs_fp32"]["cosine_mean"] > 0.9
