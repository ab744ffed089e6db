"""Check recorded TensorRT / CUDA calls against the real bindings (run in a subprocess).

    PYTHONPATH=<target dirs> python tests/trt_probe.py answer.json < request.json

The request holds the records of `tests/api_recorder.py`, the simulation's enum tables and which
real modules to check against: TensorRT's lean runtime bindings (`tensorrt_lean_bindings`:
classes, docstring signatures, enums), the strings of the builder bindings' shared library (its
module cannot load without libnvinfer: names only), and cuda-python's runtime (every call is
made for real: without a GPU each returns `(cudaErrorInsufficientDriver, ...)`, which shows its
arity and argument types). `deserialize_cuda_engine` is never called: it segfaults without a GPU.
The answer lists the problems found, one line each, and how many records were checked.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import warnings

_SIG = re.compile(r"^(?:\d+\. )?(\w+)\((.*)\) -> (.+)$")
_KEEP: list = []
_INTS = ("int", "typing.SupportsInt", "SupportsInt")


def split_params(text: str) -> list[str]:
    """Top-level comma split of a pybind11 parameter list (types may hold brackets)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(<{":
            depth += 1
        elif ch in "])>}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [p for p in [*out, cur.strip()] if p]


def signatures(member, name: str) -> list[dict]:
    """[{params: [(name, type, has_default)], returns}] from a pybind11 docstring."""
    sigs = []
    for line in (getattr(member, "__doc__", None) or "").splitlines():
        m = _SIG.match(line.strip())
        if not m or m.group(1) != name:
            continue
        params = []
        for p in split_params(m.group(2)):
            head, _, default = p.partition("=")
            pname, _, ptype = head.partition(":")
            params.append((pname.strip(), ptype.strip(), bool(default.strip())))
        if params and params[0][0] == "self":
            params = params[1:]
        sigs.append(dict(params=params, returns=m.group(3).strip()))
    return sigs


def _last(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1].strip("'\"")


def accepts(trt, ptype: str, kind: str) -> bool:
    """Whether a real parameter type takes an argument of the recorded kind."""
    last = _last(ptype)
    if ptype in _INTS:
        return kind == "int"
    if last in ("str", "bool"):
        return kind == last
    if last == "Dims":
        return kind == "Dims" or kind.startswith("tuple:") and set(kind[6:].split(",")) <= {"int"}
    if kind.startswith("enum:"):
        return kind[5:].split(".")[0] == last or last in ("Severity",)
    real = getattr(trt, last, None)
    if isinstance(real, type) and kind and not kind.startswith(("tuple", "list")):
        sub = getattr(trt, kind, None)
        return isinstance(sub, type) and issubclass(sub, real)
    return True  # buffers, objects: not checked


def returns_match(annotation: str, kind: str) -> bool:
    last = _last(annotation)
    if kind.startswith("enum:"):
        return kind[5:].split(".")[0] == last
    if kind == "None" and last[:1] == "I" and last[1:2].isupper():
        return True  # an optional object (deserialize_cuda_engine may give None)
    return last == kind or (last == "IHostMemory" and kind == "bytes")


def check_trt(trt, records, problems) -> int:
    checked = 0
    for rec in records:
        what, owner = rec[0], rec[1]
        if what == "call" and owner != "cuda" and hasattr(trt, owner):
            checked += 1
            _, _, name, kinds, kwnames, result = rec
            member = getattr(getattr(trt, owner), name, None)
            where = f"{owner}.{name}"
            if member is None:
                problems.append(f"trt {trt.__version__}: {where} does not exist")
                continue
            sigs = signatures(member, name)
            if not sigs:
                problems.append(f"trt {trt.__version__}: {where} has no readable signature")
                continue
            fits = []
            for sig in sigs:
                params, n = sig["params"], len(kinds) + len(kwnames)
                required = sum(not d for _, _, d in params)
                names = [p for p, _, _ in params]
                if not required <= n <= len(params) or not set(kwnames) <= set(names):
                    continue
                if all(accepts(trt, params[i][1], k) for i, k in enumerate(kinds)):
                    fits.append(sig)
            if not fits:
                shown = "; ".join(f"({', '.join(f'{p}: {t}' for p, t, _ in s['params'])})"
                                  for s in sigs)  # fmt: skip
                label = f"trt {trt.__version__}: {where}{tuple(kinds)}"
                problems.append(f"{label} fits none of {shown}")
            elif name != "__init__" and not any(returns_match(s["returns"], result) for s in fits):
                problems.append(
                    f"trt {trt.__version__}: {where} returns {fits[0]['returns']}, the "
                    f"simulation returns {result}"
                )
        elif what == "property" and hasattr(trt, owner):
            checked += 1
            if not isinstance(getattr(getattr(trt, owner), rec[2], None), property):
                problems.append(f"trt {trt.__version__}: {owner}.{rec[2]} is no property")
        elif what == "enum" and _enum(trt, owner) is not None:
            checked += 1
            _enum_value(trt, owner, rec[2], rec[3], f"trt {trt.__version__}", problems)
        elif what == "attr" and hasattr(trt, owner):
            checked += 1
            if not hasattr(getattr(trt, owner), rec[2]):
                problems.append(f"trt {trt.__version__}: {owner}.{rec[2]} does not exist")
        elif what == "alias" and owner == "trt":
            checked += 1
            cls, member = rec[3].split(".")
            if getattr(trt, rec[2], None) != getattr(_enum(trt, cls), member, object()):
                problems.append(f"trt {trt.__version__}: tensorrt.{rec[2]} is not {rec[3]}")
        elif what in ("type", "const") and owner == "trt" and rec[2] != "__version__":
            if hasattr(trt, rec[2]):
                checked += 1
    return checked


def _enum(module, name):
    found = getattr(module, name, None)
    if found is None and hasattr(module, "ILogger"):
        found = getattr(module.ILogger, name, None)
    return found


def _enum_value(module, cls, member, value, label, problems) -> None:
    real = getattr(_enum(module, cls), member, None)
    if real is None:
        problems.append(f"{label}: {cls}.{member} does not exist")
    elif int(getattr(real, "value", real)) != int(value):
        problems.append(f"{label}: {cls}.{member} is {int(getattr(real, 'value', real))}, "
                        f"the simulation says {value}")  # fmt: skip


def check_builder(strings: set[str], records, lean, label, problems) -> int:
    """Names the builder calls (classes, methods, properties, keywords, enums) must be in the
    builder bindings' library: as a string or, merged by the linker, the tail of one."""
    found: dict[str, bool] = {}

    def need(name: str, what: str) -> None:
        if name not in found:
            found[name] = any(s.endswith(name) for s in strings)
        if not found[name]:
            problems.append(f"{label}: {what} {name!r} is not in the builder bindings")

    checked = 0
    for rec in records:
        what, owner = rec[0], rec[1]
        if owner.startswith("cuda") or (lean is not None and hasattr(lean, owner)):
            continue
        if what == "call" and owner in ("trt",):
            continue
        if what in ("call", "property", "enum", "attr"):
            checked += 1
            need(owner, "class")
            if rec[2] != "__init__":
                need(rec[2], "member")
            for kw in rec[4] if what == "call" else ():
                need(kw, "keyword")
        elif what in ("type", "alias") and owner == "trt":
            checked += 1
            need(rec[2], "name")
    return checked


def check_cuda(rt, records, problems) -> int:
    version = getattr(importlib.import_module("cuda.bindings"), "__version__", "?")
    label, checked = f"cuda-bindings {version}", 0
    makers = {
        "int": lambda: 0,
        "bool": lambda: False,
        "cudaStream_t": lambda: rt.cudaStream_t(0),
        "cudaGraph_t": lambda: rt.cudaGraph_t(),
        "cudaGraphExec_t": lambda: rt.cudaGraphExec_t(),
    }
    for rec in records:
        what, owner = rec[0], rec[1]
        if what == "call" and owner == "cuda":
            checked += 1
            _, _, name, kinds, kwnames, result = rec
            fn = getattr(rt, name, None)
            if fn is None:
                problems.append(f"{label}: {name} does not exist")
                continue
            try:
                args = [
                    getattr(getattr(rt, k[5:].split(".")[0]), k.split(".")[1])
                    if k.startswith("enum:") else makers[k]()
                    for k in kinds
                ]  # fmt: skip
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    got = fn(*args)
            except Exception as err:  # noqa: BLE001 - each problem is reported
                problems.append(f"{label}: {name}{tuple(kinds)} raised {type(err).__name__}: {err}")
                continue
            want = len(result.split(",")) if result.startswith("tuple:") else None
            if not isinstance(got, tuple) or not isinstance(got[0], rt.cudaError_t):
                problems.append(f"{label}: {name} returned {got!r}, not an (error, ...) tuple")
            elif want != len(got):
                problems.append(f"{label}: {name} returns {len(got)} values, the simulation {want}")
        elif what == "call" and owner == "cudaStream_t":
            checked += 1
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                try:
                    stream = rt.cudaStream_t(0x7000)
                    if int(stream) != 0x7000:
                        problems.append(f"{label}: int(cudaStream_t(h)) is not h")
                except Exception as err:  # noqa: BLE001
                    problems.append(f"{label}: cudaStream_t from an int: {err}")
        elif what == "property" and owner == "cudaDeviceProp":
            checked += 1
            if not hasattr(rt.cudaDeviceProp(), rec[2]):
                problems.append(f"{label}: cudaDeviceProp has no {rec[2]}")
        elif what == "enum" and hasattr(rt, owner):
            checked += 1
            _enum_value(rt, owner, rec[2], rec[3], label, problems)
        elif what == "const" and owner == "cuda":
            checked += 1
            if repr(getattr(rt, rec[2], None)) != rec[3]:
                problems.append(f"{label}: {rec[2]} is {getattr(rt, rec[2], None)!r}, not {rec[3]}")
        elif what == "type" and owner == "cuda":
            checked += 1
            if not isinstance(getattr(rt, rec[2], None), type):
                problems.append(f"{label}: {rec[2]} is no type")
    return checked


def main() -> None:
    request = json.load(sys.stdin)
    records = [tuple(tuple(x) if isinstance(x, list) else x for x in r) for r in request["records"]]
    problems, checked, versions = [], 0, {}
    lean = None
    if request.get("trt"):
        lean = importlib.import_module(request["trt"])
        versions["trt"] = lean.__version__
        checked += check_trt(lean, records, problems)
        # Creating one works without a GPU (it logs CUDA error 35); destroying it segfaults
        # there, so it is kept until the process ends with os._exit.
        _KEEP.append(lean.Runtime(lean.Logger(lean.Logger.WARNING)))
    if request.get("builder_so"):
        data = open(request["builder_so"], "rb").read()
        strings = {s.decode() for s in re.findall(rb"[\x20-\x7e]{3,}", data)}
        label = f"builder {request.get('builder_version', '?')}"
        checked += check_builder(strings, records, lean, label, problems)
    if request.get("cuda"):
        rt = importlib.import_module("cuda.bindings.runtime")
        versions["cuda"] = getattr(importlib.import_module("cuda.bindings"), "__version__", "?")
        checked += check_cuda(rt, records, problems)
    for module_key, tables in request.get("enums", {}).items():
        module = lean if module_key == "trt" else rt if request.get("cuda") else None
        if module is None:
            continue
        for cls, members in tables.items():
            for member, value in members.items():
                checked += 1
                _enum_value(module, cls, member, value, f"{module_key} enum table", problems)
    with open(sys.argv[1], "w") as f:  # not stdout: TensorRT logs there
        json.dump(dict(problems=problems, checked=checked, versions=versions), f)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # no destructors: TensorRT's Runtime segfaults in its own without a GPU
