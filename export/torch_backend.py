"""PyTorch sessions: the reference model behind the runtime's session interface, for parity and
debugging. It lives next to the exporter, not in `runtime/` (which imports no torch and nothing
of ours), and registers the "torch" backend with `runtime.sessions.register_backend` when
imported: `import export.torch_backend`, then `Generator.from_dir(..., backend="torch")`. It
needs the `train` extra (pip install 'blip3o-edge[train]') and imports torch and `training`'s
model lazily. `path` is an engine folder: its manifest says which weights it was built from, a
checkpoint (`checkpoint.path`, loaded with `training.checkpoint.load_pipeline`) or seeded random
weights (`checkpoint.hash` = `random-weights-seed-N`, rebuilt with
`training.random_weights.random_pipeline`). The pipeline is loaded once per (folder, device,
dtype) and shared by the folder's sessions; each session runs its graph's export wrapper
(`export.wrappers.graph_module`) under `torch.no_grad()`. Feeds are numpy or torch tensors;
outputs are torch tensors left on the device; `to_host` gives numpy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from export.precision import onnx_precision, torch_dtype
from export.wrappers import graph_module
from runtime.folder.manifest import EngineFolderError, load_manifest, rebuild_hint
from runtime.folder.spec import GraphSpec, check_feeds, io_dtype
from runtime.sessions import register_backend
from training.config import from_dict

_RANDOM = re.compile(r"^random-weights-seed-(\d+)$")
_PIPELINES: dict[tuple[str, str, str], Any] = {}  # (folder, device, dtype) -> ReferencePipeline


def _torch():
    try:
        import torch
    except ImportError as err:
        raise RuntimeError(
            "the torch backend needs PyTorch: install the `train` extra "
            "(pip install 'blip3o-edge[train]'), or use backend='onnxruntime'"
        ) from err
    return torch


def compute_dtype(precision: str):
    """The torch dtype the reference runs in: fp16/bf16 as such, fp32 for fp32 and the Q/DQ
    precisions (whose graphs are made from the fp32 export)."""
    io_dtype(precision)  # validates the name
    return torch_dtype(onnx_precision(precision))


def load_folder_pipeline(folder: str | Path, device: str = "cpu", precision: str = "fp32"):
    """The folder's `ReferencePipeline` on `device` in the precision's compute dtype (cached)."""
    torch = _torch()
    folder = Path(folder).resolve()
    dtype = compute_dtype(precision)
    key = (str(folder), str(torch.device(device)), str(dtype))
    if key not in _PIPELINES:
        _PIPELINES[key] = _load(folder, load_manifest(folder), device, dtype)
    return _PIPELINES[key]


def _load(folder: Path, manifest: dict, device: str, dtype):
    ckpt = manifest.get("checkpoint") or {}
    random = _RANDOM.match(str(ckpt.get("hash", "")))
    if ckpt.get("path"):
        from training.checkpoint import load_pipeline

        if not Path(ckpt["path"]).is_dir():
            raise EngineFolderError(
                f"{folder} was built from checkpoint {ckpt['path']}, which does not exist here; "
                "the torch backend needs those weights (or rebuild the folder: "
                f"{rebuild_hint(manifest)})"
            )
        # the manifest's config is what the folder was built for (depth, decoder scheduler)
        config = from_dict(manifest["config"])
        return load_pipeline(
            ckpt["path"], device=device, dtype=dtype, config=config, scheduler="preset"
        )
    if random is None:
        raise EngineFolderError(
            f"{folder}: manifest checkpoint {ckpt!r} has neither a path nor a "
            f"'random-weights-seed-N' hash; rebuild with: {rebuild_hint(manifest)}"
        )
    from training.random_weights import random_pipeline

    torch = _torch()
    with torch.random.fork_rng(devices=[]):  # random_pipeline seeds torch's global RNG
        pipe = random_pipeline(from_dict(manifest["config"]), int(random.group(1)))
    pipe.model.to(device=device, dtype=dtype)
    pipe.decoder.to(device=device, dtype=dtype)
    return pipe


def clear_cache() -> None:
    """Drop the cached pipelines (frees their memory once no session holds them)."""
    _PIPELINES.clear()


class TorchSession:
    def __init__(
        self,
        spec: GraphSpec,
        path: str | Path,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        pipeline=None,
    ) -> None:
        torch = _torch()
        self.spec, self.precision, self.device = spec, precision, torch.device(device)
        self._dtype = compute_dtype(precision)
        if pipeline is None:
            pipeline = load_folder_pipeline(path, device, precision)
        from export.onnx_export import call_graph  # imports torch

        self._module, self._call = graph_module(spec.name, pipeline).eval(), call_graph

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        torch = _torch()
        if all(isinstance(v, np.ndarray) for v in feeds.values()):
            check_feeds(self.spec, feeds, self.precision)
        missing = [n for n in self.spec.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.spec.name}: missing inputs {missing}")
        kwargs = {}
        for t in self.spec.inputs:
            value = feeds[t.name]
            if isinstance(value, np.ndarray):
                if value.dtype.name == "bfloat16":  # numpy has no bf16; ml_dtypes does
                    value = value.astype(np.float32)
                value = torch.from_numpy(np.ascontiguousarray(value))
            value = value.to(self.device)
            kwargs[t.name] = value.to(self._dtype) if t.dtype == "float" else value
        with torch.no_grad():
            outs = self._call(self._module, self.spec, kwargs)
        if len(outs) != len(self.spec.outputs):
            raise RuntimeError(
                f"{self.spec.name}: module returned {len(outs)} outputs, spec lists "
                f"{self.spec.output_names}"
            )
        return dict(zip(self.spec.output_names, outs))

    def to_host(self, value: Any) -> np.ndarray:
        return to_host(value)

    def close(self) -> None:
        self._module = None


register_backend("torch", TorchSession)


def to_host(value: Any) -> np.ndarray:
    """numpy: float32 for bf16 (which numpy lacks), the tensor's own dtype otherwise."""
    torch = _torch()
    if not isinstance(value, torch.Tensor):
        return np.asarray(value)
    value = value.detach().cpu()
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
