"""Builds that are run twice at once, interrupted, or fail early leave the folder consistent:
one build holds the folder's lock, a live process's temporary files are never deleted, a
swallowed Ctrl-C still stops the build before the stage is kept, and a build that made nothing
leaves no empty folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from export.build_folder import (
    BuildFolder,
    InterruptGuard,
    LockedError,
    Stage,
    build_lock,
    lock_path,
    remove_partials,
)
from export.build_plan import BuildError, BuildRequest, build


def test_a_second_build_of_the_same_folder_is_refused(tmp_path):
    folder = tmp_path / "tiny-fp32"
    with build_lock(folder):
        with pytest.raises(LockedError, match=f"another build \\(pid {os.getpid()}\\)"):
            with build_lock(folder):
                pass
        with pytest.raises(BuildError, match="another build"):
            build(BuildRequest(variant="tiny", out=folder, random_weights=True, progress=False))
    with build_lock(folder):  # released once the holder leaves
        pass
    assert lock_path(folder).parent == folder.parent  # the lock is not one of the folder's files


def test_the_lock_is_held_across_processes(tmp_path):
    folder = tmp_path / "f"
    holder = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(os.getcwd())!r})
        from pathlib import Path
        from export.build_folder import build_lock
        with build_lock(Path({str(folder)!r})):
            print("held", flush=True)
            time.sleep(30)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {proc.pid}"):
            with build_lock(folder):
                pass
    finally:
        proc.kill()
        proc.wait()
    with build_lock(folder):  # the kernel released the dead holder's lock
        pass


def test_partials_of_live_processes_are_kept(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    live, stale = (
        tmp_path / f".partial-{os.getpid()}-export-dit",
        tmp_path / f".partial-{dead_pid}-x",
    )
    live.mkdir()
    stale.mkdir()
    live_tmp = tmp_path / f"negative_features.npy.tmp-{os.getppid()}"
    stale_tmp = tmp_path / f"manifest.json.tmp-{dead_pid}"
    live_tmp.write_bytes(b"")
    stale_tmp.write_bytes(b"")
    removed = remove_partials(tmp_path)
    assert sorted(removed) == sorted([stale, stale_tmp])
    assert live.is_dir() and live_tmp.is_file()


def test_a_swallowed_ctrl_c_still_stops_the_build(tmp_path):
    def swallowing(tmp):
        (tmp / "half.onnx").write_bytes(b"half")
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pass  # what an exporter deep inside may do
        return {}

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background
    with InterruptGuard() as guard:
        engine = BuildFolder(tmp_path, {}, guard)
        with pytest.raises(KeyboardInterrupt):
            engine.run(Stage("export:dit", {"k": 1}, swallowing))
    assert not (tmp_path / "half.onnx").exists()
    assert "export:dit" not in engine.manifest["stages"]
    assert not list(tmp_path.glob(".partial-*"))
    assert signal.getsignal(signal.SIGINT) is before  # the guard puts back what it found


def test_a_build_that_made_nothing_leaves_no_folder(tmp_path, monkeypatch):
    def full(self, stage):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(BuildFolder, "run", full)
    folder = tmp_path / "engines" / "tiny-fp32"
    with pytest.raises(OSError, match="No space"):
        build(BuildRequest(variant="tiny", out=folder, random_weights=True, progress=False))
    assert not folder.exists()
