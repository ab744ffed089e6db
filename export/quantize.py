"""INT8 / FP8 Q/DQ post-training quantization of the exported generation graphs.

An exported fp32 graph plus feeds recorded from the real sampler (`export.calibration`) become
the same graph with Q/DQ on the inputs of its MatMul, Gemm and Conv nodes (weights stored
quantized) and float32 I/O: it runs in ONNX Runtime on CPU and is the hand-off for a strongly
typed TensorRT build. ModelOpt's ONNX PTQ quantizes (entropy calibration for INT8, max for FP8);
ONNX Runtime's `quantize_static` (MinMax, per-channel weights) is the INT8 fallback, configured
for what TensorRT's parser takes: symmetric activations and weights (zero points 0) and float
biases (no INT32 bias DequantizeLinear). Every result passes the TensorRT lint
(`export.trt_lint`) or the call fails naming the node and rule. The source graph is never
written to: ModelOpt rewrites its input file in place (it grew by 1-3 KB), so both quantizers
read a private copy. The text
decoder and vision tower stay in high precision: LLM quantization belongs to weight-only (INT4
AWQ) or SmoothQuant recipes with per-token scales, not to this per-tensor PTQ (out of scope).

Sensitive modules stay unquantized (`_KEEP`): embedders, caption projection, final layers,
timestep modulation, first/last convs. Exported node names are generic (`node_linear_7`), so the
rule goes by module path: a node's `namespace` metadata is a `/`-separated list of `<module
path>: <class>` scopes ending in the aten op (`: DiTStepGraph/dit: NextDiTCrossAttn/dit.norm_out:
FinalLayer/dit.norm_out.linear_1: Linear/linear: aten.linear.default`); a node is kept, whatever
its op type, when one of its module paths holds a `_KEEP` entry as whole dot-separated
components (`norm_out` matches `dit.norm_out.linear_1`, not `dit.norm_outer`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from export import trt_lint
from export.onnx_export import ort_session, run_ort

log = logging.getLogger(__name__)

QUANTIZABLE = ("dit", "dit_step", "unet", "unet_step", "vae_decoder")
QUANT_PRECISIONS = ("int8", "fp8")
METHODS = ("modelopt", "ort")
HIGH_PRECISIONS = ("fp32", "fp16")
OP_TYPES = ("MatMul", "Gemm", "Conv")
CALIBRATION = {"int8": "entropy", "fp8": "max"}  # ModelOpt calibration method per precision
# quantize_static as TensorRT parses it: zero points 0 (symmetric), biases left in float
TRT_ORT_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}

# adaLN `norm1.linear` / resnet `time_emb_proj` read the timestep embedding: GEMVs (M = batch),
# nothing to gain from quantizing them, measurably less error when kept.
_DIT_KEEP = ("time_caption_embed", "patch_embedder", "caption_projection", "norm_out",
             "norm1.linear")  # fmt: skip
_UNET_KEEP = ("unet.conv_in", "unet.conv_out", "unet.time_embedding", "unet.add_embedding",
              "time_emb_proj")  # fmt: skip
_VAE_KEEP = ("vae.post_quant_conv", "vae.decoder.conv_in", "vae.decoder.conv_out")
_KEEP = dict(zip(QUANTIZABLE, (_DIT_KEEP, _DIT_KEEP, _UNET_KEEP, _UNET_KEEP, _VAE_KEEP)))
# Wrapper class (the root scope of every node) -> graph name, for calls without `graph=`.
_WRAPPERS = dict(zip(("DiTGraph", "DiTStepGraph", "UNetGraph", "UNetStepGraph", "VAEDecoderGraph"),
                     QUANTIZABLE))  # fmt: skip

Feeds = dict[str, np.ndarray]
Model = onnx.ModelProto | str | Path  # a loaded graph or its path


def _load(model: Model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model), load_external_data=False)


def node_scopes(node: onnx.NodeProto) -> list[tuple[str, str]]:
    """(module path, class) scopes of a node from the dynamo exporter's `namespace` metadata."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = [part.rsplit(": ", 1) for part in meta.get("namespace", "").split("/")]
    return [(s[0].strip(), s[1]) for s in scopes[:-1] if len(s) == 2]  # the last is the aten op


def graph_of(model: Model) -> str:
    """The graph name of an exported generation graph, read off its root wrapper class."""
    for scopes in filter(None, map(node_scopes, _load(model).graph.node)):
        if (name := _WRAPPERS.get(scopes[0][1].rsplit(".", 1)[-1])) is not None:
            return name
    raise ValueError(f"cannot tell which graph this is; pass graph= (one of {QUANTIZABLE})")


def excluded_modules(graph: str, model: Model) -> dict[str, list[str]]:
    """{kept module: names of the nodes inside it} for one graph (rule: module docstring)."""
    if graph not in QUANTIZABLE:
        raise ValueError(f"graph {graph!r} is not quantizable; valid: {', '.join(QUANTIZABLE)}")
    patterns = {p: re.compile(rf"(?:^|\.){re.escape(p)}(?:\.|$)") for p in _KEEP[graph]}
    found: dict[str, list[str]] = {p: [] for p in patterns}
    annotated = 0
    for node in _load(model).graph.node:
        paths = [path for path, _ in node_scopes(node)]
        annotated += bool(paths)
        for p, rx in patterns.items():
            if any(rx.search(path) for path in paths):
                found[p].append(node.name)
    if not annotated:
        raise ValueError(f"{graph}: no node has `namespace` metadata; export with dynamo=True")
    for p in (p for p, names in found.items() if not names):
        log.warning("%s: no node belongs to the excluded module %r", graph, p)
    return found


def exclusions(graph: str, onnx_model: Model) -> list[str]:
    """Names of the nodes of `graph` that stay in high precision (see the module docstring)."""
    return sorted({n for names in excluded_modules(graph, onnx_model).values() for n in names})


def _check_calibration(calibration: list[Feeds], inputs: list[str]) -> None:
    for i, feeds in enumerate(calibration):
        if sorted(feeds) != sorted(inputs):
            raise ValueError(f"calibration feed {i} has inputs {sorted(feeds)}; graph: {inputs}")
        if bad := [k for k in inputs if feeds[k].shape != calibration[0][k].shape]:  # stacked
            raise ValueError(f"calibration feed {i}: shapes of {bad} differ from feed 0's")


@contextmanager
def _ort_quantization_restored():
    """Undo ModelOpt's in-place patches of `onnxruntime.quantization` (methods, QDQ registries)
    on leaving: left in place, ORT's own `quantize_static` later in the same process fails
    ("Quantization parameters are not specified for param silu_1")."""
    from onnxruntime.quantization import base_quantizer, calibrate, qdq_quantizer, registry

    mods = (calibrate, base_quantizer, qdq_quantizer, registry)
    classes = [v for m in mods for v in vars(m).values()
               if isinstance(v, type) and v.__module__ == m.__name__]  # fmt: skip
    saved = [(owner, dict(vars(owner))) for owner in (*mods, *classes)]
    tables = [(t, dict(t)) for t in (registry.QDQRegistry, registry.QLinearOpsRegistry)]
    try:
        yield
    finally:
        for owner, attrs in saved:
            for key in set(vars(owner)) - set(attrs):
                delattr(owner, key)
            for key, value in attrs.items():
                if vars(owner).get(key) is not value:
                    setattr(owner, key, value)
        for table, content in tables:
            table.clear()
            table.update(content)


def _restore_excluded_inputs(path: Path, names: list[str]) -> int:
    """Feed excluded nodes the original tensor where a quantizer rewired them to a shared DQ
    (one Q/DQ per activation feeds every consumer: the DiT's final layer shares `silu(temb)`)."""
    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    keep, restored = set(names), 0
    for node in (n for n in model.graph.node if n.name in keep):
        for i, tensor in enumerate(node.input):
            dq = producer.get(tensor)
            quant = producer.get(dq.input[0]) if dq and dq.op_type == "DequantizeLinear" else None
            if quant is not None and quant.op_type == "QuantizeLinear":
                node.input[i] = quant.input[0]
                restored += 1
    if restored:
        onnx.save(model, str(path))  # external data, if any, stays where it is
    return restored


class _Reader:
    """The recorded feeds as onnxruntime's `CalibrationDataReader` protocol (what ModelOpt and
    `quantize_static` iterate: one inference per feed), calling `on_sample` per feed handed out
    (a build's progress bar)."""

    def __init__(self, calibration: list[Feeds], on_sample=None) -> None:
        self.calibration, self.on_sample = calibration, on_sample
        self.rewind()

    def rewind(self) -> None:
        self.it = iter(self.calibration)

    def get_first(self) -> Feeds:
        return self.calibration[0]

    def get_next(self) -> Feeds | None:
        feeds = next(self.it, None)
        if feeds is not None and self.on_sample is not None:
            self.on_sample()
        return feeds


def _modelopt(src, dst, precision, reader, inputs, names, high_precision, external) -> None:
    from modelopt.onnx.quantization import quantize

    first = reader.get_first()
    shapes = ",".join(f"{k}:{'x'.join(map(str, first[k].shape))}" for k in inputs)
    with _ort_quantization_restored():
        quantize(
            str(src), quantize_mode=precision, calibration_data_reader=reader,
            calibration_shapes=shapes,  # one calibration step = one recorded feed
            calibration_method=CALIBRATION[precision], calibration_eps=["cpu"],
            op_types_to_quantize=list(OP_TYPES), high_precision_dtype=high_precision,
            nodes_to_exclude=[f"^{re.escape(n)}$" for n in names],  # regexes, re.match
            dq_only=True,  # weights stored quantized
            use_external_data_format=external, output_path=str(dst), log_level="WARNING",
        )  # fmt: skip


def _ort(src, dst, reader, names, external) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader.rewind()
    quantize_static(
        str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(OP_TYPES), per_channel=True, nodes_to_exclude=names,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external,
        extra_options=TRT_ORT_OPTIONS,
    )  # fmt: skip


def _private_copy(src: Path, model: onnx.ModelProto, into: Path) -> Path:
    """The graph and its external data files copied into `into`: what the quantizers read."""
    into.mkdir()
    shutil.copy2(src, into / src.name)
    ext = onnx.TensorProto.EXTERNAL
    for t in (t for t in model.graph.initializer if t.data_location == ext):
        location = {e.key: e.value for e in t.external_data}["location"]
        if not (into / location).exists():
            (into / location).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src.parent / location, into / location)
    return into / src.name


def quantize_graph(
    onnx_path: str | Path,
    out_path: str | Path,
    *,
    precision: str,
    calibration: list[Feeds],
    method: str = "modelopt",
    graph: str | None = None,
    high_precision: str = "fp32",
    on_sample=None,
) -> dict:
    """Quantize an exported fp32 generation graph to INT8 or FP8 Q/DQ; returns a report dict.

    `calibration`: feeds named like the graph inputs, all of one shape. `method` "modelopt" does
    INT8 and FP8 and falls back to ORT for INT8 when ModelOpt raises (a logged warning); "ort" is
    INT8 only. Either way the result passes the TensorRT lint (`export.trt_lint.TrtLintError`
    otherwise) and `onnx_path` is only read. `graph` is read off the wrapper class when None.
    `high_precision`: the unquantized ops' dtype with ModelOpt, "fp32" (ORT CPU) or "fp16"
    (strongly typed TensorRT). `on_sample()` is called for each feed the quantizer runs (one
    ONNX Runtime inference each, with every activation as an output).
    """
    checks = [("precision", precision, QUANT_PRECISIONS), ("method", method, METHODS)]
    for name, value, valid in [*checks, ("high_precision", high_precision, HIGH_PRECISIONS)]:
        if value not in valid:
            raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}")
    if method == "ort" and precision != "int8":
        raise ValueError(f"method 'ort' quantizes to int8 only, got precision {precision!r}")
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise ValueError(f"calibration is empty: give a non-empty list of feed dicts ({onnx_path})")
    src, out = Path(onnx_path), Path(out_path)
    if not src.is_file():
        raise FileNotFoundError(f"ONNX graph {src} does not exist")
    model = _load(src)
    graph = graph or graph_of(model)
    found = excluded_modules(graph, model)
    names = sorted({n for ns in found.values() for n in ns})
    inputs = [i.name for i in model.graph.input]
    _check_calibration(calibration, inputs)
    ext = onnx.TensorProto.EXTERNAL  # a graph past 2 GB has external data (protobuf limit)
    external = any(t.data_location == ext for t in model.graph.initializer)

    start, used, fallback = time.perf_counter(), method, None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", dir=out.parent))
    try:
        dst = tmp / "out" / out.name
        if method == "modelopt":
            try:
                dst.parent.mkdir()
                copy = _private_copy(src, model, tmp / "src")
                reader = _Reader(calibration, on_sample)
                _modelopt(copy, dst, precision, reader, inputs, names, high_precision, external)
            except Exception as err:  # noqa: BLE001 - any ModelOpt failure is reported
                if precision != "int8":
                    raise RuntimeError(f"ModelOpt {precision} failed on {src}: {err}") from err
                fallback, used = f"{type(err).__name__}: {err}", "ort"
                log.warning("ModelOpt int8 failed on %s (%s); falling back to ORT", src, fallback)
                shutil.rmtree(tmp)
                tmp.mkdir()
        if used == "ort":
            dst.parent.mkdir(exist_ok=True)
            reader = _Reader(calibration, on_sample)
            _ort(_private_copy(src, model, tmp / "src"), dst, reader, names, external)
        if not dst.is_file():
            raise RuntimeError(f"{used} wrote no quantized graph for {src}")
        restored = _restore_excluded_inputs(dst, names)
        trt_lint.check(dst, name=f"{graph} ({precision}, {used})")
        for f in dst.parent.iterdir():  # the graph and its external data, final names
            if f.name.startswith(out.name):
                os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ops = Counter(n.op_type for n in _load(out).graph.node)
    report = dict(
        graph=graph, precision=precision, method=used, fallback=fallback,
        high_precision=high_precision if used == "modelopt" else "fp32",
        excluded_nodes=len(names), excluded_modules={p: len(ns) for p, ns in found.items()},
        restored_inputs=restored, quantize_linear=ops["QuantizeLinear"],
        dequantize_linear=ops["DequantizeLinear"], calibration_samples=len(calibration),
        seconds=round(time.perf_counter() - start, 2), path=str(out),
    )  # fmt: skip
    log.info("quantized %s to %s with %s: %s", graph, precision, used, report)
    return report


def measure_error(
    fp32_path: str | Path,
    quant_path: str | Path,
    feeds_list: list[Feeds],
    *,
    residual: str | None = None,
) -> dict[str, float]:
    """Quantized vs fp32 outputs in ORT CPU over held-out feeds: cosine per feed and output, the
    largest absolute difference and the largest fp32 output (its scale). With `residual` (an
    input, e.g. a step graph's "latents") it is subtracted from the outputs first, so the metric
    sees the model's update rather than the latents it carries over. Only the first output is
    compared (a step graph's `next_latents`; its sampler-state output, the x0 prediction or the
    velocity, is the same model output recombined, and counts through later calls' latents)."""
    if not feeds_list:
        raise ValueError("feeds_list is empty: give at least one held-out feed dict")
    ref, quant = ort_session(fp32_path), ort_session(quant_path)
    cosines, max_abs, ref_max = [], 0.0, 0.0
    for feeds in feeds_list:
        a, b = run_ort(ref, feeds), run_ort(quant, feeds)
        base = 0.0 if residual is None else feeds[residual].astype(np.float64)
        for name in list(a)[:1]:
            x = (a[name].astype(np.float64) - base).ravel()
            y = (b[name].astype(np.float64) - base).ravel()
            denom = np.linalg.norm(x) * np.linalg.norm(y)
            cosines.append(float(x @ y / denom) if denom > 0 else float(np.allclose(x, y)))
            max_abs = max(max_abs, float(np.abs(x - y).max()))
            ref_max = max(ref_max, float(np.abs(x).max()))
    return dict(cosine_min=min(cosines), cosine_mean=float(np.mean(cosines)), max_abs=max_abs,
                ref_max_abs=ref_max)  # fmt: skip
