"""Verification at open: sizes by default, sha256 on request or on the first open after a build."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from runtime.errors import UserError
from runtime.folder.manifest import UNVERIFIED, EngineFolderError, verify_folder
from runtime.generator import Generator


@pytest.fixture
def folder(tiny_engine_dir, tmp_path):
    copy = tmp_path / "tiny-fp32"
    shutil.copytree(tiny_engine_dir, copy)
    (copy / UNVERIFIED).unlink(missing_ok=True)
    return copy


def _graph_file(folder, name="dit_step"):
    manifest = json.loads((folder / "manifest.json").read_text())
    return folder / manifest["graphs"][name]["file"]


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fast_checks_sizes_full_checks_sha256(folder):
    _flip_last_byte(_graph_file(folder))  # same size, other bytes
    Generator.from_dir(folder).close()  # fast: sizes only, no byte read
    with pytest.raises(EngineFolderError, match="dit_step.fp32.onnx does not match the sha256"):
        Generator.from_dir(folder, verify="full")
    Generator.from_dir(folder, verify="none").close()
    path = _graph_file(folder, "unet_step")
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    with pytest.raises(EngineFolderError, match=r"unet_step.fp32.onnx is \d+ bytes, the manifest"):
        Generator.from_dir(folder)


def test_the_first_open_after_a_build_is_full_and_clears_the_marker(folder):
    (folder / UNVERIFIED).touch()
    _flip_last_byte(_graph_file(folder))
    with pytest.raises(EngineFolderError, match="does not match the sha256"):
        Generator.from_dir(folder)  # fast, but the build's marker asks for full
    assert (folder / UNVERIFIED).exists()  # a failed check keeps it
    _flip_last_byte(_graph_file(folder))  # restored
    Generator.from_dir(folder).close()
    assert not (folder / UNVERIFIED).exists()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert verify_folder(folder, manifest, "onnxruntime") == "fast"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_keeps_its_marker_with_a_warning(folder, caplog):
    (folder / UNVERIFIED).touch()
    folder.chmod(0o555)
    try:
        caplog.set_level(logging.WARNING, logger="runtime.folder.manifest")
        Generator.from_dir(folder).close()
        assert "hashed at every open" in caplog.text and (folder / UNVERIFIED).exists()
    finally:
        folder.chmod(0o755)


def test_unknown_modes_are_named(folder):
    with pytest.raises(UserError, match="unknown verify mode 'sha'; valid: none, fast, full"):
        Generator.from_dir(folder, verify="sha")


def test_the_cli_offers_both(folder, tmp_path):
    _flip_last_byte(_graph_file(folder))

    def cli(*extra):
        args = ["generate", "a red circle", "--engines", str(folder), "-q", *extra]
        return subprocess.run(
            [sys.executable, "-m", "runtime", *args, "--out", str(tmp_path / "x.png")],
            capture_output=True, text=True,
        )  # fmt: skip

    full = cli("--verify", "full", "--steps", "1", "--decoder-steps", "1")
    assert full.returncode == 2 and "does not match the sha256" in full.stderr
    assert "\n" not in full.stderr.strip()
    bad = cli("--verify", "sha")
    assert bad.returncode == 2 and "invalid choice: 'sha'" in bad.stderr
