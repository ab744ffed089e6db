"""A Triton Inference Server model repository generated from an engine folder.

    python -m runtime triton-repo --engines engines/tiny-fp32 --out triton-repo

One model per graph, its `config.pbtxt` derived from the graph's spec in the manifest (names,
data types at the folder's precision, dims with -1 for every dynamic axis; `max_batch_size: 0`
because the specs carry their batch axis themselves and the step graphs take `[1]` scalars that
Triton must not batch), its file linked (or copied) as `<graph>/1/model.onnx` (ONNX Runtime
backend) or `model.plan` (TensorRT, with `--backend tensorrt`). Plus `blip3o`, a Python-backend
orchestrator whose `model.py` runs the runtime's own generation loop (`Generator.generate`)
with every session call made through BLS (`pb_utils.InferenceRequest(...).exec()`); it needs
this package and the engine folder's host assets (tokenizer, embeddings) importable and
readable inside Triton's Python environment (the `ENGINES` and `RUNTIME_PATH` parameters).

Triton itself was never run here: the configs are validated against tritonclient's
model-config protobuf and the manifest, and the orchestrator's BLS path is tested with a fake
`triton_python_backend_utils` that runs the graphs on ONNX Runtime.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from runtime.errors import UserError
from runtime.folder.graphs import GENERATION_GRAPHS
from runtime.folder.manifest import file_path, graph_spec, read_manifest
from runtime.folder.spec import numpy_dtype
from runtime.params import GeneratorParams, field_info

ORCHESTRATOR = "blip3o"
TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
}


def triton_type(dtype: str, precision: str) -> str:
    return TRITON_TYPES[str(numpy_dtype(dtype, precision))]


def triton_dims(shape) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def _tensor(t, precision: str) -> str:
    dims = ", ".join(str(d) for d in triton_dims(t.shape))
    return (
        f'  {{\n    name: "{t.name}"\n    data_type: {triton_type(t.dtype, precision)}\n'
        f"    dims: [ {dims} ]\n  }}"
    )


def graph_config(manifest: dict, name: str, *, backend: str, kind: str) -> str:
    """config.pbtxt text of one graph."""
    spec = graph_spec(manifest, name)
    precision = manifest["precision"]
    head = 'platform: "tensorrt_plan"' if backend == "tensorrt" else 'backend: "onnxruntime"'
    inputs = ",\n".join(_tensor(t, precision) for t in spec.inputs)
    outputs = ",\n".join(_tensor(t, precision) for t in spec.outputs)
    return (
        f'name: "{name}"\n{head}\nmax_batch_size: 0\n'
        f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
        f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n"
    )


_TRITON_TYPES = {int: "TYPE_INT64", float: "TYPE_FP32", str: "TYPE_STRING"}


def param_inputs() -> list[tuple[str, str, str, type]]:
    """(Triton input name, Triton type, GeneratorParams field, its Python type): one optional
    input per field of `runtime.params.GeneratorParams`, named in capitals (`decoder_steps` ->
    DECODER_STEPS), so a field added there is an input here."""
    return [
        (name.upper(), _TRITON_TYPES[info["kind"]], name, info["kind"])
        for name, info in field_info(GeneratorParams).items()
    ]


def orchestrator_config(manifest: dict, *, engines: Path, runtime_path: Path, kind: str) -> str:
    size = int(manifest["sampler"]["image_size"])
    scalars = [(name, triton_type) for name, triton_type, _, _ in param_inputs()]
    optional = "".join(
        f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ 1 ]\n    optional: true\n  }},\n'
        for n, t in scalars
    )
    return (
        f'name: "{ORCHESTRATOR}"\nbackend: "python"\nmax_batch_size: 0\n'
        f'input [\n{optional}  {{\n    name: "PROMPT"\n    data_type: TYPE_STRING\n'
        f"    dims: [ 1 ]\n  }}\n]\n"
        f'output [\n  {{\n    name: "IMAGES"\n    data_type: TYPE_UINT8\n'
        f"    dims: [ -1, {size}, {size}, 3 ]\n  }}\n]\n"
        f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n"
        f'parameters: {{\n  key: "ENGINES"\n  value: {{ string_value: "{engines}" }}\n}}\n'
        f'parameters: {{\n  key: "RUNTIME_PATH"\n'
        f'  value: {{ string_value: "{runtime_path}" }}\n}}\n'
    )


def write_repository(
    engines: Path, out: Path, *, backend: str = "onnxruntime", gpu: bool = False, copy: bool = False
) -> list[str]:
    """Write the repository into `out` (created; must be empty); returns the model names."""
    engines = Path(engines).resolve()
    manifest = read_manifest(engines)
    if backend not in ("onnxruntime", "tensorrt"):
        raise UserError(f"--backend {backend!r}: Triton repositories take onnxruntime or tensorrt")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty")
    kind = "KIND_GPU" if gpu or backend == "tensorrt" else "KIND_CPU"
    names = []
    for name in GENERATION_GRAPHS:
        entry = manifest["graphs"][name]
        if backend == "tensorrt":
            if "engine" not in entry:
                raise UserError(f"{engines} has no TensorRT engine for {name}")
            source, target = file_path(engines, entry["engine"]), "model.plan"
        else:
            source, target = file_path(engines, entry), "model.onnx"
        version = out / name / "1"
        version.mkdir(parents=True)
        _place(source, version / target, copy)
        for extra in entry.get("external_data", []) if backend != "tensorrt" else []:
            extra_name = extra["file"] if isinstance(extra, dict) else extra
            _place(engines / extra_name, version / extra_name, copy)
        (out / name / "config.pbtxt").write_text(
            graph_config(manifest, name, backend=backend, kind=kind)
        )
        names.append(name)
    model = out / ORCHESTRATOR / "1"
    model.mkdir(parents=True)
    shutil.copyfile(Path(__file__).with_name("triton_model.py"), model / "model.py")
    runtime_path = Path(__file__).resolve().parents[2]
    (out / ORCHESTRATOR / "config.pbtxt").write_text(
        orchestrator_config(manifest, engines=engines, runtime_path=runtime_path, kind=kind)
    )
    return [*names, ORCHESTRATOR]


def _place(source: Path, target: Path, copy: bool) -> None:
    if copy:
        shutil.copyfile(source, target)
    else:
        os.symlink(source, target)


def cmd_triton_repo(args) -> int:
    for name in write_repository(
        args.engines, args.out, backend=args.backend, gpu=args.gpu, copy=args.copy
    ):
        print(Path(args.out) / name / "config.pbtxt")
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser("triton-repo", help="a Triton model repository from an engine folder")
    t.add_argument("--engines", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    t.add_argument("--gpu", action="store_true", help="KIND_GPU instances (ONNX Runtime)")
    t.add_argument("--copy", action="store_true", help="copy the graphs instead of symlinks")
    t.set_defaults(func=cmd_triton_repo)
