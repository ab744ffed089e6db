"""ONNX Runtime sessions: CPU, or CUDA / TensorRT execution providers when the install has them.

On CPU, feeds and outputs are numpy arrays. With a GPU provider the session binds inputs and
outputs through I/O binding and returns `OrtValue`s that stay on the device, so a sampling loop
feeds one step's output to the next without a host round trip; `to_host` copies on demand.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import UserError
from runtime.folder.manifest import EngineFolderError
from runtime.folder.spec import GraphSpec, check_feeds
from runtime.machine.compat import DEVICE_PROVIDERS, INSTALL_ORT

try:
    import onnxruntime as ort
except ImportError as err:  # the base install has no ONNX Runtime: the user picks one
    raise UserError(f"the onnxruntime backend needs ONNX Runtime ({err}); {INSTALL_ORT}") from err

log = logging.getLogger(__name__)


def providers_for(device: str) -> list[str]:
    """Execution providers for a device name: cpu, cuda or tensorrt (ORT's TensorRT EP)."""
    if device not in DEVICE_PROVIDERS:
        raise UserError(f"unknown device {device!r}; valid: {', '.join(DEVICE_PROVIDERS)}")
    wanted = DEVICE_PROVIDERS[device]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise UserError(
            f"device {device!r} needs onnxruntime's {wanted[0]}, which this install lacks "
            f"(available: {available}); uninstall it and pip install 'blip3o-edge[gpu]', or use "
            "device='cpu'"
        )
    return [p for p in wanted if p in available]


class OrtSession:
    def __init__(
        self,
        spec: GraphSpec,
        path: str | Path,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        threads: int | None = None,
        validate: bool = True,
    ) -> None:
        self.spec = spec
        self.precision = precision
        self.device = device
        self.validate = validate
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        providers = providers_for(device)
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options, providers=providers
            )
        except Exception as err:  # onnxruntime's own error types share no public base
            raise EngineFolderError(
                f"{path} is not an ONNX graph ONNX Runtime can load "
                f"({str(err).splitlines()[0][:200]}); rebuild the engine folder"
            ) from err
        self._on_gpu = device != "cpu"
        names = [i.name for i in self._session.get_inputs()]
        if names != spec.input_names:
            raise EngineFolderError(
                f"{path}: graph inputs {names} differ from the spec {spec.input_names}; "
                "rebuild the engine folder"
            )

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        if not self._on_gpu:
            if self.validate:
                check_feeds(self.spec, feeds, self.precision)
            outs = self._session.run(self.spec.output_names, feeds)
            return dict(zip(self.spec.output_names, outs))
        binding = self._session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
            binding.bind_ortvalue_input(name, value)
        for name in self.spec.output_names:
            binding.bind_output(name, "cuda", 0)
        self._session.run_with_iobinding(binding)
        return dict(zip(self.spec.output_names, binding.get_outputs()))

    def to_host(self, value: Any) -> np.ndarray:
        return value.numpy() if isinstance(value, ort.OrtValue) else np.asarray(value)

    def close(self) -> None:
        self._session = None
