"""Recording proxies over the simulated `tensorrt` and `cuda.bindings.runtime` modules.

`Recorder.wrap(name, module)` returns a module whose attribute reads, calls, enum members and
constants are recorded as plain tuples while the simulation runs underneath unchanged; objects
the API returns (engines, contexts, builders, configs...) come back wrapped, so calls on them are
recorded under their class name. The records are what `tests/trt_probe.py` checks against the
real bindings in a subprocess:

- ("call", owner, name, argument kinds, keyword names, result kind): a function or method call;
- ("property", owner, name): a property read;
- ("enum", enum class, member, value): an enum member read;
- ("const", module, name, value): a plain constant (`cudaStreamNonBlocking`);
- ("type", module, name): a class constructed or used as a type (`cudaStream_t`);
- ("attr", class, name): a class attribute read (`Logger.WARNING`).
"""

from __future__ import annotations

import enum
import inspect
import types

_RAW = (int, float, str, bytes, bool, type(None))
_WRAPPED = ("cudaDeviceProp",)  # cuda-python result objects whose attribute reads are recorded


def kind(value) -> str:
    """The kind of an argument or result, as the probe rebuilds it for the real bindings."""
    if isinstance(value, Proxy):
        return object.__getattribute__(value, "_owner")
    if isinstance(value, enum.Enum):
        return f"enum:{type(value).__name__}.{value.name}"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(value, str):
        return "str"
    if value is None:
        return "None"
    if isinstance(value, tuple) and type(value).__name__ not in ("Dims",):
        return "tuple:" + ",".join(kind(v) for v in value)
    if isinstance(value, list):
        return "list"
    return type(value).__name__


class Recorder:
    """Collects records from every wrapped module; `api_classes` are wrapped when returned."""

    def __init__(self) -> None:
        self.records: set[tuple] = set()

    def wrap(self, name: str, module: types.ModuleType) -> types.ModuleType:
        owner = "cuda" if name.startswith("cuda") else "trt"
        proxy = types.ModuleType(name)
        recorder = self

        def getattr_(attr):
            return recorder.read(owner, getattr(module, attr), owner, attr)

        proxy.__getattr__ = getattr_  # module-level __getattr__ (PEP 562)
        return proxy

    def read(self, owner: str, value, scope: str, attr: str):
        """Record one attribute read of `scope` (a module or API class name) and wrap it."""
        if isinstance(value, enum.Enum):
            self.records.add(("enum", type(value).__name__, value.name, int(value)))
            if scope in ("cuda", "trt") and attr != value.name:  # trt.float32 = DataType.FLOAT
                self.records.add(("alias", scope, attr, f"{type(value).__name__}.{value.name}"))
            elif scope not in ("cuda", "trt"):  # Logger.WARNING: a class attribute
                self.records.add(("attr", scope, attr))
            return value
        if inspect.isclass(value):
            if issubclass(value, enum.Enum):
                return EnumProxy(self, value)
            return ClassProxy(self, value, owner)
        if callable(value):
            return self.function(value, scope, attr)
        if isinstance(value, _RAW):
            if scope in ("cuda", "trt"):
                self.records.add(("const", scope, attr, repr(value)))
            else:
                self.records.add(("property", scope, attr))
            return value
        return self.result(value)

    def function(self, fn, scope: str, name: str):
        def call(*args, **kwargs):
            result = fn(*args, **kwargs)
            kinds = tuple(kind(a) for a in args)
            self.records.add(("call", scope, name, kinds, tuple(sorted(kwargs)), kind(result)))
            return self.result(result)

        return call

    def result(self, value):
        """Wrap what the API hands back: instances of simulated API classes are proxied (also
        inside cuda-python's result tuples)."""
        if type(value) is tuple:
            return tuple(self.result(v) for v in value)
        module = getattr(type(value), "__module__", "")
        api = module.startswith("tests.simulated_tensorrt") or type(value).__name__ in _WRAPPED
        if api and not isinstance(value, (enum.Enum, tuple, bytes)):
            return Proxy(self, value, type(value).__name__)
        return value


class EnumProxy:
    """An enum class whose member reads are recorded; members are the simulation's own."""

    def __init__(self, recorder: Recorder, cls) -> None:
        self._recorder, self._cls = recorder, cls

    def __getattr__(self, name):
        value = getattr(self._cls, name)
        if isinstance(value, enum.Enum):
            self._recorder.records.add(("enum", self._cls.__name__, name, int(value)))
        return value

    def __call__(self, *args):
        return self._cls(*args)


class ClassProxy:
    """An API class: construction is a recorded `__init__` call, class attributes are read
    through the recorder (`Logger.WARNING`)."""

    def __init__(self, recorder: Recorder, cls, owner: str) -> None:
        self._recorder, self._cls, self._owner = recorder, cls, owner

    def __getattr__(self, name):
        return self._recorder.read(self._owner, getattr(self._cls, name), self._cls.__name__, name)

    def __call__(self, *args, **kwargs):
        value = self._cls(*(_unwrap(a) for a in args), **kwargs)
        kinds = tuple(kind(a) for a in args)
        self._recorder.records.add(
            ("call", self._cls.__name__, "__init__", kinds, tuple(sorted(kwargs)), "None")
        )
        self._recorder.records.add(("type", self._owner, self._cls.__name__))
        return self._recorder.result(value)

    def __instancecheck__(self, instance):
        return isinstance(instance, self._cls)


class Proxy:
    """An instance of a simulated API class: attribute reads and method calls are recorded."""

    def __init__(self, recorder: Recorder, target, owner: str) -> None:
        object.__setattr__(self, "_recorder", recorder)
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_owner", owner)

    def __getattr__(self, name):
        recorder, target = self._recorder, self._target
        value = getattr(target, name)
        if inspect.ismethod(value):
            fn = recorder.function(lambda *a, **k: value(*(_unwrap(x) for x in a), **k),
                                   self._owner, name)  # fmt: skip
            return fn
        return recorder.read("trt", value, self._owner, name)

    def __bytes__(self):
        return bytes(self._target)


def _unwrap(value):
    return object.__getattribute__(value, "_target") if isinstance(value, Proxy) else value
