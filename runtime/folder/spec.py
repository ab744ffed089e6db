"""Graph I/O specs: the one contract between exporter, engine builder and runtime (no torch).

A `GraphSpec` lists a graph's input and output tensors with dtypes and dims; a dim is a fixed
size, a named symbol with a min/opt/max range, or `symbol+K` (a symbol plus a constant, e.g. the
KV length after one decode step). Everything else is derived here and never written twice:
ONNX dynamic axes, TensorRT optimization profiles, concrete shapes for buffers, sample inputs for
parity and calibration, and feed checks before a session runs.

Float tensors are declared with dtype `float`: the graph's I/O precision, resolved per engine
precision by `io_dtype` (fp32 and the Q/DQ precisions keep float32 I/O).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")
_IO_DTYPE = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp8": "float32",
    "int8": "float32",
}
_SYMBOL = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\+(\d+))?$")


def io_dtype(precision: str) -> str:
    """The numpy-style dtype name of a graph's float I/O at an engine precision."""
    if precision not in _IO_DTYPE:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return _IO_DTYPE[precision]


@dataclass(frozen=True)
class Dim:
    """A named dynamic dimension with its TensorRT profile range."""

    name: str
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise ValueError(f"dim {self.name}: need 0 <= min <= opt <= max, got {self}")

    @property
    def static(self) -> bool:
        return self.min == self.max


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `low`/`high` bound the values of integer inputs (inclusive);
    `high` may name a dim, meaning that dim's size minus one (an index into it)."""

    name: str
    dtype: str  # "float" (graph precision), "float32", "int64", "int32", "bool"
    shape: tuple[int | str, ...]
    low: float | None = None
    high: float | str | None = None


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[Dim, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        known = {d.name for d in self.dims}
        for t in self.inputs + self.outputs:
            for d in t.shape:
                if isinstance(d, str) and _parse(d)[0] not in known:
                    raise ValueError(f"{self.name}.{t.name}: dim {d!r} is not declared")
            for key in ("low", "high"):  # a number, or (high) the name of a declared dim
                v = getattr(t, key)
                number = isinstance(v, (int, float)) and not isinstance(v, bool)
                if not (v is None or number or (key == "high" and v in known)):
                    raise ValueError(
                        f"{self.name}.{t.name}: {key} {v!r} is neither a number nor a dim of "
                        f"the graph ({', '.join(sorted(known)) or 'none'})"
                    )

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def static(self) -> bool:
        """True when every dim is fixed (CUDA-graph capturable)."""
        return all(d.static for d in self.dims)

    def dim(self, name: str) -> Dim:
        for d in self.dims:
            if d.name == name:
                return d
        raise KeyError(f"{self.name} has no dim {name!r}; dims: {[d.name for d in self.dims]}")

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")


def _parse(token: str) -> tuple[str, int]:
    match = _SYMBOL.match(token)
    if not match:
        raise ValueError(f"bad dim expression {token!r}; expected 'name' or 'name+K'")
    return match.group(1), int(match.group(2) or 0)


def resolve_shape(tensor: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
    """Concrete shape of a tensor for given symbol sizes."""
    out = []
    for d in tensor.shape:
        if isinstance(d, int):
            out.append(d)
        else:
            name, offset = _parse(d)
            if name not in sizes:
                raise KeyError(f"{tensor.name}: no size given for dim {name!r}")
            out.append(sizes[name] + offset)
    return tuple(out)


def profile_sizes(spec: GraphSpec, which: str) -> dict[str, int]:
    """Symbol sizes at one end of the profile: which in {'min', 'opt', 'max'}."""
    if which not in ("min", "opt", "max"):
        raise ValueError(f"which must be 'min', 'opt' or 'max', got {which!r}")
    return {d.name: getattr(d, which) for d in spec.dims}


def dynamic_axes(spec: GraphSpec) -> dict[str, dict[int, str]]:
    """ONNX export dynamic axes: {tensor: {axis: symbol}} for axes whose dim is not fixed.

    Axes of `name+K` dims are named `name_plus_K` so the exporter keeps them symbolic.
    """
    axes: dict[str, dict[int, str]] = {}
    fixed = {d.name for d in spec.dims if d.static}
    for t in spec.inputs + spec.outputs:
        for i, d in enumerate(t.shape):
            if isinstance(d, str):
                name, offset = _parse(d)
                if name not in fixed:
                    axes.setdefault(t.name, {})[i] = name if not offset else f"{name}_plus_{offset}"
    return axes


def trt_profile(spec: GraphSpec) -> dict[str, tuple[tuple[int, ...], ...]]:
    """TensorRT optimization profile: {input: (min_shape, opt_shape, max_shape)}."""
    ends = [profile_sizes(spec, w) for w in ("min", "opt", "max")]
    return {t.name: tuple(resolve_shape(t, s) for s in ends) for t in spec.inputs}


def value_bounds(t: TensorSpec, sizes: dict[str, int]) -> tuple[float | None, float | None]:
    """(low, high) of a tensor's values for given dim sizes."""
    high = sizes[t.high] - 1 if isinstance(t.high, str) else t.high
    return t.low, high


def numpy_dtype(dtype: str, precision: str = "fp32") -> np.dtype:
    name = io_dtype(precision) if dtype == "float" else dtype
    if name == "bfloat16":
        import ml_dtypes  # only needed for bf16 host buffers

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def sample_inputs(
    spec: GraphSpec,
    sizes: dict[str, int] | None = None,
    *,
    precision: str = "fp32",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random feeds that satisfy the spec: floats ~ N(0, 1), integers within [low, high]."""
    sizes = sizes if sizes is not None else profile_sizes(spec, "opt")
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec.inputs:
        shape = resolve_shape(t, sizes)
        dtype = numpy_dtype(t.dtype, precision)
        t_low, t_high = value_bounds(t, sizes)
        if dtype.kind == "f" or t.dtype == "float":
            value = rng.standard_normal(shape).astype(np.float32)
            if t_low is not None or t_high is not None:
                value = rng.uniform(t_low or 0.0, t_high or 1.0, shape).astype(np.float32)
            feeds[t.name] = value.astype(dtype)
        elif dtype == np.bool_:
            feeds[t.name] = np.ones(shape, dtype=bool)
        else:
            low = int(t_low if t_low is not None else 0)
            high = int(t_high if t_high is not None else 100)
            feeds[t.name] = rng.integers(low, high + 1, shape).astype(dtype)
    return feeds


def check_feeds(spec: GraphSpec, feeds: dict[str, np.ndarray], precision: str = "fp32") -> None:
    """Raise a clear error for a missing/extra input, a wrong dtype, a shape outside the profile
    or an integer value outside its declared range. Symbol sizes must agree across inputs."""
    missing = [n for n in spec.input_names if n not in feeds]
    extra = [n for n in feeds if n not in spec.input_names]
    if missing or extra:
        raise ValueError(f"{spec.name}: missing inputs {missing}, unexpected inputs {extra}")
    sizes: dict[str, int] = {}
    for t in spec.inputs:
        value = feeds[t.name]
        want = numpy_dtype(t.dtype, precision)
        if value.dtype != want:
            raise ValueError(f"{spec.name}.{t.name}: dtype {value.dtype}, expected {want}")
        if value.ndim != len(t.shape):
            raise ValueError(f"{spec.name}.{t.name}: rank {value.ndim}, expected {len(t.shape)}")
        for axis, (d, n) in enumerate(zip(t.shape, value.shape)):
            if isinstance(d, int):
                if n != d:
                    raise ValueError(f"{spec.name}.{t.name}: axis {axis} is {n}, expected {d}")
                continue
            name, offset = _parse(d)
            size = n - offset
            if sizes.setdefault(name, size) != size:
                raise ValueError(
                    f"{spec.name}.{t.name}: dim {name} is {size} here but {sizes[name]} elsewhere"
                )
            dim = spec.dim(name)
            if not dim.min <= size <= dim.max:
                raise ValueError(
                    f"{spec.name}.{t.name}: {name}={size} is outside [{dim.min}, {dim.max}]"
                )
    for t in spec.inputs:
        value = feeds[t.name]
        t_low, t_high = value_bounds(t, sizes)
        if (t_low is not None or t_high is not None) and value.size and value.dtype.kind in "iu":
            lo, hi = value.min(), value.max()
            if (t_low is not None and lo < t_low) or (t_high is not None and hi > t_high):
                raise ValueError(
                    f"{spec.name}.{t.name}: values in [{lo}, {hi}] outside [{t_low}, {t_high}]"
                )


def spec_to_dict(spec: GraphSpec) -> dict:
    return asdict(spec)


def spec_from_dict(data: dict) -> GraphSpec:
    def tensor(d: dict) -> TensorSpec:
        return TensorSpec(**{**d, "shape": tuple(d["shape"])})

    return GraphSpec(
        name=data["name"],
        inputs=tuple(tensor(t) for t in data["inputs"]),
        outputs=tuple(tensor(t) for t in data["outputs"]),
        dims=tuple(Dim(**d) for d in data["dims"]),
    )
