"""The import direction the architecture promises, checked on the source."""

import ast
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "diffusers", "modelopt"}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def sources(package: str):
    return sorted((REPO / package).rglob("*.py"))


def test_runtime_imports_nothing_of_ours_and_no_torch():
    # the optional PyTorch session backend is the documented exception
    exempt = {REPO / "runtime" / "sessions" / "torch.py"}
    for path in sources("runtime"):
        if path in exempt:
            continue
        for name in imports_of(path):
            top = name.split(".")[0]
            assert top not in HEAVY | {"training", "export"}, f"{path}: imports {name}"


def test_training_imports_neither_export_nor_runtime():
    for path in sources("training"):
        for name in imports_of(path):
            assert name.split(".")[0] not in {"export", "runtime"}, f"{path}: imports {name}"


def test_export_uses_only_runtime_plain_data():
    # specs, graphs and manifest are the contract; the schedules are the ones the runtime feeds;
    # errors, hardware (precision per GPU), probe (machine facts) and compat (install rules) are
    # the plain-data decisions the exporter shares with `runtime doctor`
    allowed = {"runtime.spec", "runtime.graphs", "runtime.manifest", "runtime.schedule"}
    allowed |= {"runtime.samplers"}  # the sampler plans the step graphs are fed
    allowed |= {"runtime.errors", "runtime.hardware", "runtime.probe", "runtime.compat"}
    allowed |= {"runtime.manifest_schema"}  # the manifest's schema, with the manifest
    # the build samples (decoder negative, calibration feeds) with the runtime's own loop over
    # torch sessions it registers: the runtime's Generator and session registry, no copy
    allowed |= {"runtime.generator", "runtime.generation", "runtime.sessions"}
    for path in sources("export"):
        for name in imports_of(path):
            if name.split(".")[0] == "runtime":
                assert name in allowed, f"{path}: imports {name}"


@pytest.mark.parametrize("package", ["runtime", "export", "training"])
def test_top_level_names_are_ours(package):
    spec = importlib.util.find_spec(package)
    assert spec is not None and Path(spec.origin).resolve().is_relative_to(REPO), spec


def test_runtime_exports_generator_lazily():
    import subprocess
    import sys

    code = (
        "import sys, runtime; assert 'runtime.generator' not in sys.modules; "
        "from runtime.generator import Generator; assert runtime.Generator is Generator; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
