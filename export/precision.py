"""Precision rules of a build: which dtype each of a folder's artefacts is made in.

A folder has one precision (`fp32|fp16|bf16|fp8|int8`); its graphs are exported at fp32 or
fp16/bf16 (INT8/FP8 Q/DQ graphs are made from the fp32 export; the other graphs of an INT8/FP8
TensorRT folder at 16 bits behind float32 I/O, `tensorrt_16bit`), its host assets are loaded in
fp16 when the graphs' I/O is 16-bit, and the PyTorch model runs in the torch dtype of the ONNX
precision. Plain rules on names, shared by the stages, the weights' source, the cost estimates
and the torch backend.
"""

from __future__ import annotations

from runtime.folder.spec import io_dtype
from runtime.machine.hardware import PLANNING_SM, supports

QUANTIZED = ("int8", "fp8")
# the torch dtype (torch.<name>) each ONNX precision is exported and computed in
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def onnx_precision(precision: str) -> str:
    """Precision of the exported ONNX: Q/DQ graphs are made from the fp32 export."""
    return "fp32" if precision in ("fp32", *QUANTIZED) else precision


def tensorrt_16bit(sm: tuple[int, int] | None) -> str:
    """The 16-bit precision of the unquantized (text, vision) graphs of an INT8/FP8 TensorRT
    folder: bf16 where the GPU runs it (SM 8.0+, Orin included: Qwen2.5 is trained in bf16),
    else fp16; a dry run without a GPU plans for `PLANNING_SM`."""
    return "bf16" if supports("bf16", sm or PLANNING_SM) else "fp16"


def host_precision(precision: str) -> str:
    """Dtype the host assets are loaded in: fp16 when the I/O is 16-bit, else fp32."""
    return "fp16" if io_dtype(precision) in ("float16", "bfloat16") else "fp32"


def torch_dtype(precision: str):
    """The torch dtype of an ONNX precision (fp32|fp16|bf16)."""
    import torch  # the `train` extra: importing this module needs no torch

    return getattr(torch, TORCH_DTYPE_NAMES[precision])
