"""Export one wrapper module to ONNX from its graph spec, and run ONNX graphs in ONNX Runtime.

`torch.onnx.export(dynamo=True)` with an explicit opset; dynamic shapes come from the spec's
dims (one `torch.export.Dim` per symbol, shared across inputs); weights go to external data when
the model passes 2 GB. The traced sizes avoid 0 and 1 (torch.export specializes those), so the
graph is exercised at other shapes by the parity tests.
"""

from __future__ import annotations

import gc
import inspect
import logging
from pathlib import Path

import numpy as np
import torch

from export.precision import TORCH_DTYPE_NAMES, torch_dtype
from runtime.folder.spec import GraphSpec, numpy_dtype, profile_sizes, resolve_shape, sample_inputs

log = logging.getLogger(__name__)

OPSET = 20
TORCH_DTYPES = {precision: torch_dtype(precision) for precision in TORCH_DTYPE_NAMES}


def trace_sizes(spec: GraphSpec) -> dict[str, int]:
    """Symbol sizes to trace with: the profile's opt size, moved off 0/1 when the dim is dynamic."""
    sizes = profile_sizes(spec, "opt")
    for d in spec.dims:
        if not d.static and sizes[d.name] < 2:
            sizes[d.name] = min(2, d.max)
    return sizes


def dynamic_shapes(spec: GraphSpec) -> dict[str, dict[int, torch.export.Dim]]:
    """torch.export dynamic shapes keyed by forward argument (= spec input) name."""
    dims = {
        d.name: torch.export.Dim(d.name, min=d.min, max=d.max) for d in spec.dims if not d.static
    }
    shapes: dict[str, dict[int, torch.export.Dim]] = {}
    for t in spec.inputs:
        axes = {i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str) and d in dims}
        shapes[t.name] = axes or None
    return shapes


def _forward_inputs(module: torch.nn.Module, spec: GraphSpec) -> tuple[list[str], list | None]:
    """(the spec inputs the wrapper's forward takes by name, those its `*rest` takes or None)."""
    params = inspect.signature(module.forward).parameters.values()
    if not any(p.kind is p.VAR_POSITIONAL for p in params):
        return list(spec.input_names), None
    named = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    if spec.input_names[: len(named)] != named:
        raise ValueError(f"{spec.name}: forward takes {named} first; spec: {spec.input_names}")
    return named, spec.input_names[len(named) :]


def forward_args(module: torch.nn.Module, spec: GraphSpec, values: dict) -> tuple[tuple, dict]:
    """A wrapper's forward arguments from per-input `values`, as (args, kwargs): by name, or
    positionally when the forward takes `*rest` (the decode graph's per-layer cache), the
    remaining inputs in spec order."""
    named, rest = _forward_inputs(module, spec)
    if rest is None:
        return (), {name: values[name] for name in named}
    return tuple(values[name] for name in named + rest), {}


def call_graph(module: torch.nn.Module, spec: GraphSpec, feeds: dict) -> tuple:
    """Run a wrapper on torch feeds keyed by spec input name: its outputs as a tuple."""
    args, kwargs = forward_args(module, spec, feeds)
    outs = module(*args, **kwargs)
    return (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)


def torch_feeds(
    spec: GraphSpec, feeds: dict[str, np.ndarray], precision: str = "fp32", device="cpu"
) -> dict[str, torch.Tensor]:
    """numpy feeds -> torch tensors, float inputs in the graph's compute dtype."""
    out = {}
    for t in spec.inputs:
        value = torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(device)
        if t.dtype == "float":
            value = value.to(TORCH_DTYPES.get(precision, torch.float32))
        out[t.name] = value
    return out


def export_graph(
    module: torch.nn.Module,
    spec: GraphSpec,
    path: str | Path,
    *,
    precision: str = "fp32",
    opset: int = OPSET,
) -> Path:
    """Export `module` (its forward takes the spec inputs: `forward_args`) to `path` (.onnx,
    + .data if > 2 GB)."""
    path = Path(path)
    dtype = TORCH_DTYPES.get(precision)
    if dtype is None:
        raise ValueError(f"ONNX export takes precision fp32, fp16 or bf16, got {precision!r}")
    module = module.eval().to(dtype)
    sizes = trace_sizes(spec)
    feeds = torch_feeds(spec, sample_inputs(spec, sizes, precision="fp32"), precision)
    log.info("exporting %s (%s) at %s", spec.name, precision, sizes)
    with torch.no_grad():
        # torch.export first: it raises when a dim the spec calls dynamic would be specialized,
        # where torch.onnx.export would quietly fall back to a static graph.
        args, kwargs = forward_args(module, spec, feeds)
        shapes = dynamic_shapes(spec)
        named, rest = _forward_inputs(module, spec)
        if rest is not None:  # positional: the shapes nest like the forward's parameters
            shapes = [*(shapes[n] for n in named), tuple(shapes[n] for n in rest)]
        exported = torch.export.export(module, args, kwargs=kwargs, dynamic_shapes=shapes)
        program = torch.onnx.export(
            exported,
            input_names=spec.input_names,
            output_names=spec.output_names,
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path), external_data=None)  # external data only past 2 GB
    del program, exported
    _drop_rewriter_graphs()
    return path


def _drop_rewriter_graphs() -> None:
    """Let the exported graph and the weights it references be freed after an export.

    onnxscript's rewrite rules (0.7) live at module level and their pattern matchers keep the
    last graph they matched, initializers included (which reference the torch parameters): a 3B
    text decoder's weights would stay resident through every later stage of a build.
    """
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to drop
        return
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for attr in ("_graph", "_current_node", "_match", "_tracer"):
                if hasattr(obj, attr):
                    setattr(obj, attr, None)


def ort_session(path: str | Path, providers: list[str] | None = None):
    """An ONNX Runtime session on CPU (or the given providers), all optimizations on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
    )


def run_ort(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def expected_output_shapes(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, tuple]:
    """Output shapes the spec promises for these feeds (symbols read off the inputs)."""
    sizes: dict[str, int] = {}
    for t in spec.inputs:
        for d, n in zip(t.shape, feeds[t.name].shape):
            if isinstance(d, str) and "+" not in d:
                sizes[d] = n
    return {t.name: resolve_shape(t, sizes) for t in spec.outputs}


def cast_feeds(spec: GraphSpec, feeds: dict[str, np.ndarray], precision: str) -> dict:
    """Cast float inputs of numpy feeds to the graph's I/O dtype at a precision."""
    return {
        t.name: feeds[t.name].astype(numpy_dtype(t.dtype, precision), copy=False)
        for t in spec.inputs
    }
