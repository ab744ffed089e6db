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
    # the PyTorch session backend lives in export/ (export.torch_backend) and registers itself
    for path in sources("runtime"):
        for name in imports_of(path):
            top = name.split(".")[0]
            assert top not in HEAVY | {"training", "export"}, f"{path}: imports {name}"


def test_training_imports_neither_export_nor_runtime():
    for path in sources("training"):
        for name in imports_of(path):
            assert name.split(".")[0] not in {"export", "runtime"}, f"{path}: imports {name}"


def test_export_uses_the_runtime_core_not_its_edges():
    # the exporter shares the runtime's contract (runtime.folder), its loop and sampler plans
    # (runtime.jobs, runtime.generator, runtime.sessions: the build samples the decoder negative
    # and records calibration feeds with the runtime's own loop) and its machine rules
    # (runtime.machine); never its edges: the CLI and the server
    edges = ("runtime.cli", "runtime.server", "runtime.__main__")
    for path in sources("export"):
        for name in imports_of(path):
            assert not name.startswith(edges), f"{path}: imports {name}"


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


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, function-local imports included (a cycle
    made legal by a local import is still a cycle)."""
    modules = {module_name(p): p for p in sources(package)}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imported in imports_of(path):
            # `from pkg import mod` names a module too
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                deps.add(imported)
        graph[name] = deps - {package}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("package", ["runtime", "export"])
def test_no_import_cycles(package):
    cycle = find_cycle(import_graph(package))
    assert cycle is None, f"{package} imports in a circle: {' -> '.join(cycle)}"
