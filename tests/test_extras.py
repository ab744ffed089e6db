"""No install we tell users to run mixes two onnxruntime distributions.

`onnxruntime` and `onnxruntime-gpu` (and the other ORT builds) install the same `onnxruntime`
module: two in one environment overwrite each other, and whichever came last wins. The checker
resolves an extra combination of pyproject.toml (self references like `blip3o-edge[train]`
included) and, where the dependencies are installed, follows their own requirements through
importlib.metadata (nvidia-modelopt's `[onnx]` extra, for one, pulls onnxruntime-gpu on x86-64).
It is unit-tested on bad samples first, so a pass means something.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import re
from pathlib import Path

import pytest

from runtime.machine.probe import ORT_DISTRIBUTIONS

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
Requirement = pytest.importorskip("packaging.requirements").Requirement

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
ORT = {re.sub(r"[-_.]+", "-", d) for d in ORT_DISTRIBUTIONS}
EXCLUSIVE = {"cpu", "gpu"}  # the one documented conflict: pick one ONNX Runtime


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def direct_requirements(project: dict, extras) -> list[Requirement]:
    """Base dependencies plus those of `extras`, expanding self references recursively."""
    own, seen, out = canonical(project["name"]), set(), []
    todo = [""] + list(extras)  # "" is the base install
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra and extra not in project.get("optional-dependencies", {}):
            raise KeyError(f"no extra {extra!r} in {project['name']}")
        specs = project["optional-dependencies"][extra] if extra else project["dependencies"]
        for req in map(Requirement, specs):
            if canonical(req.name) == own:
                todo += sorted(req.extras)
            else:
                out.append(req)
    return out


def installed_requires(name: str) -> list[str] | None:
    try:
        return importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
        return None  # not installed here (tensorrt, onnxruntime-gpu): a leaf


def closure(reqs, requires=installed_requires) -> set[str]:
    """Every distribution `reqs` pull in, following `requires(name)` with markers evaluated for
    this platform and the extras each requirement asks for."""
    names, seen, todo = set(), set(), list(reqs)
    while todo:
        req = todo.pop()
        key = (canonical(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(key[0])
        for spec in requires(req.name) or []:
            sub = Requirement(spec)
            wanted = [{"extra": e} for e in ("", *req.extras)]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in wanted):
                todo.append(sub)
    return names


def mixes(names: set[str]) -> set[str]:
    """The onnxruntime distributions in `names` when there are two or more."""
    found = {canonical(n) for n in names} & ORT
    return found if len(found) > 1 else set()


def combinations(project: dict):
    """Every set of extras a user could name, except the documented cpu + gpu conflict."""
    extras = sorted(project.get("optional-dependencies", {}))
    for n in range(len(extras) + 1):
        for combo in itertools.combinations(extras, n):
            if not EXCLUSIVE <= set(combo):
                yield combo


BAD = {
    "name": "bad-pkg",
    "dependencies": ["numpy"],
    "optional-dependencies": {
        "cpu": ["onnxruntime>=1.20"],
        "quant": ["bad_pkg[cpu]", "quantkit[onnx]"],
        "all": ["Bad.Pkg[quant]", "onnxruntime_gpu"],
    },
}
FAKE_METADATA = {"quantkit": ['onnxruntime-gpu; extra == "onnx"', "numpy"], "numpy": []}


def test_the_checker_catches_mixes_it_should():
    # direct, through two levels of self reference and a spelling variant
    names = {canonical(r.name) for r in direct_requirements(BAD, ["all"])}
    assert mixes(names) == {"onnxruntime", "onnxruntime-gpu"}
    assert mixes({canonical(r.name) for r in direct_requirements(BAD, ["cpu"])}) == set()
    # transitive: quantkit's [onnx] extra pulls onnxruntime-gpu, its base install does not
    quant = direct_requirements(BAD, ["quant"])
    assert mixes(closure(quant, FAKE_METADATA.get)) == {"onnxruntime", "onnxruntime-gpu"}
    plain = [Requirement("quantkit"), Requirement("onnxruntime")]
    assert mixes(closure(plain, FAKE_METADATA.get)) == set()
    assert ("cpu", "quant") in set(combinations(BAD)) and ("all", "cpu") in set(combinations(BAD))
    with pytest.raises(KeyError, match="no extra 'gpu'"):
        direct_requirements(BAD, ["gpu"])


def test_every_extra_combination_has_at_most_one_onnxruntime():
    extras = set(PROJECT["optional-dependencies"])
    assert {"cpu", "gpu", "trt", "export", "dev", "train"} <= extras
    assert not {canonical(r.name) for r in direct_requirements(PROJECT, [])} & ORT, "base"
    for combo in combinations(PROJECT):
        names = {canonical(r.name) for r in direct_requirements(PROJECT, combo)}
        assert not mixes(names), (combo, mixes(names))
    both = {canonical(r.name) for r in direct_requirements(PROJECT, ["cpu", "gpu"])}
    assert mixes(both), "cpu and gpu are the two ONNX Runtimes"
    for extra, wanted in (("cpu", "onnxruntime"), ("gpu", "onnxruntime-gpu")):
        assert {canonical(r.name) for r in direct_requirements(PROJECT, [extra])} & ORT == {wanted}


def test_installed_dependencies_pull_no_second_onnxruntime():
    """Through the metadata of what is installed here (the dev venv: torch, modelopt, ...)."""
    cache: dict[str, list[str] | None] = {}

    def requires(name):
        if name not in cache:
            cache[name] = installed_requires(name)
        return cache[name]

    # what a set of extras pulls is the union of what each pulls (plus the base install): one
    # closure per extra, then every combination as a union (2^N unions, not 2^N walks)
    extras = sorted(PROJECT.get("optional-dependencies", {}))
    pulled = {e: closure(direct_requirements(PROJECT, [e]), requires) for e in ["", *extras]}
    for combo in combinations(PROJECT):
        names = set().union(pulled[""], *(pulled[e] for e in combo))
        assert not mixes(names), (combo, mixes(names))


def test_this_environment_has_one_onnxruntime():
    found = [d for d in ORT_DISTRIBUTIONS if installed_requires(d) is not None]
    assert len(found) <= 1, f"{found} installed together: the last one installed wins"


def documented_installs() -> list[tuple[str, tuple[str, ...]]]:
    """(where, extras) for every `pip install` of this project in the README and CI."""
    found = []
    for name in ("README.md", ".ci/run"):
        text = (REPO / name).read_text()
        for line in text.splitlines():
            if "pip install" not in line:
                continue
            for extras in re.findall(r"""(?:\.|blip3o-edge)\[([a-z0-9_,\- ]+)\]""", line):
                found.append((name, tuple(e.strip() for e in extras.split(","))))
    return found


def test_documented_install_commands_exist_and_never_mix():
    installs = documented_installs()
    assert ("README.md", ("export", "cpu")) in installs
    assert (".ci/run", ("dev", "cpu")) in installs
    for where, extras in installs:
        names = {canonical(r.name) for r in direct_requirements(PROJECT, extras)}
        assert not mixes(names), (where, extras)
