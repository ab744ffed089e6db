"""`runtime/` is self-contained: it imports nothing of `export` / `training` and never torch,
transformers or diffusers; the PyTorch reference backend plugs in from `export.torch_backend`."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
FORBIDDEN = ("torch", "transformers", "diffusers", "export", "training")


def test_no_runtime_module_names_a_forbidden_package():
    found = []
    for path in RUNTIME.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert found == []


def test_every_runtime_module_imports_with_torch_export_training_blocked(tmp_path):
    """Import every runtime module in a subprocess where importing a forbidden package fails."""
    code = textwrap.dedent(
        f"""
        import importlib, importlib.abc, pkgutil, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {FORBIDDEN!r}:
                    raise ImportError(f"blocked: {{name}}")

        sys.meta_path.insert(0, Block())
        import runtime
        runtime.Generator
        for info in pkgutil.walk_packages(runtime.__path__, "runtime."):
            if info.name.startswith("runtime.cpp") or info.name == "runtime.__main__":
                continue
            if info.name == "runtime.server.triton_model":  # runs inside Triton's Python backend
                continue
            importlib.import_module(info.name)
        assert not [m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r}]
        print("ok")
        """
    )
    root = str(RUNTIME.parent)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_torch_backend_registers_itself_from_export():
    code = textwrap.dedent(
        """
        from runtime.sessions import backends
        assert "torch" not in backends()
        import export.torch_backend
        assert "torch" in backends()
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(RUNTIME.parent), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
