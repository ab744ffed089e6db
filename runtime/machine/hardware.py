"""Which precision a GPU runs and which one `--precision auto` picks: plain data, one place.

The exporter (`export.build_plan`, `export.trt_plan`) and `python -m runtime doctor` both decide
from these functions, so what doctor says the exporter will pick is what it picks. Nothing here
probes the machine (`runtime.machine.probe` does) or imports a backend: every decision is a
function of a backend name and a compute capability, unit-tested without a GPU.

- `auto` on TensorRT picks FP8 on SM >= 8.9, INT8 on Jetson Orin (SM 8.7, Ampere: no FP8, and
  memory bandwidth is what limits a board) and FP16 elsewhere.
- `auto` on ONNX Runtime picks fp32: it runs on every execution provider, CPU included (bf16
  graphs do not run on ORT's CPU provider; reduced precisions are asked for by name).
- An explicit precision a GPU cannot run is an error that says what to use instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import UserError
from runtime.folder.spec import PRECISIONS

REQUESTS = ("auto", *PRECISIONS)
BUILD_BACKENDS = ("onnxruntime", "tensorrt")
FP8_MIN_SM = (8, 9)
BF16_MIN_SM = (8, 0)
INT8_MIN_SM = (7, 2)
# What a TensorRT `--dry-run` plans for when no GPU is visible (a real build needs the GPU).
PLANNING_SM = (9, 0)
_FALLBACKS = {"fp8": ("int8", "bf16", "fp16"), "bf16": ("fp16",), "int8": ("fp16",)}


@dataclass(frozen=True)
class GPU:
    """What a compute capability is and which reduced precisions its tensor cores run."""

    sm: tuple[int, int]
    name: str
    family: str
    fp8: bool
    int8: bool
    bf16: bool


# What each GPU runs, as facts; unknown compute capabilities fall back to the SM thresholds above.
GPUS = {
    g.sm: g
    for g in (
        # Jetson AGX Xavier: its last JetPack (5.x) ships TensorRT 8.5, listed for the rules only.
        GPU((7, 2), "Jetson Xavier", "Volta", fp8=False, int8=True, bf16=False),
        GPU((7, 5), "T4 / RTX 20", "Turing", fp8=False, int8=True, bf16=False),
        GPU((8, 0), "A100 / A30", "Ampere", fp8=False, int8=True, bf16=True),
        GPU((8, 6), "A10 / A40 / RTX 30", "Ampere", fp8=False, int8=True, bf16=True),
        GPU((8, 7), "Jetson Orin", "Ampere", fp8=False, int8=True, bf16=True),
        GPU((8, 9), "L4 / L40 / RTX 40", "Ada Lovelace", fp8=True, int8=True, bf16=True),
        GPU((9, 0), "H100 / H200", "Hopper", fp8=True, int8=True, bf16=True),
        GPU((10, 0), "B200 / GB200", "Blackwell", fp8=True, int8=True, bf16=True),
        # Assumed: Jetson Thor reports SM 11.0 from CUDA 13 on (SM 10.1 before).
        GPU((11, 0), "Jetson Thor", "Blackwell", fp8=True, int8=True, bf16=True),
    )
}


def check_sm(sm) -> tuple[int, int]:
    """`sm` as a (major, minor) tuple of ints, or a UserError naming the bad value."""
    ok = isinstance(sm, (tuple, list)) and len(sm) == 2
    if not (ok and all(isinstance(v, int) and v >= 0 for v in sm)):
        raise UserError(f"compute capability must be (major, minor) ints, got {sm!r}")
    return (sm[0], sm[1])


def sm_text(sm: tuple[int, int] | None) -> str | None:
    """(8, 7) -> '8.7', the spelling of manifests and nvidia-smi."""
    return None if sm is None else f"{sm[0]}.{sm[1]}"


def gpu(sm: tuple[int, int]) -> GPU:
    """The table entry for a compute capability; unknown ones follow the same SM thresholds."""
    sm = check_sm(sm)
    rules = (sm >= FP8_MIN_SM, sm >= INT8_MIN_SM, sm >= BF16_MIN_SM)
    return GPUS.get(sm) or GPU(sm, "unknown GPU", "unknown family", *rules)


def supports(precision: str, sm: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability runs `precision` (fp32 and fp16 run everywhere)."""
    _check_precision(precision, PRECISIONS)
    g = gpu(sm)
    return {"fp32": True, "fp16": True, "bf16": g.bf16, "fp8": g.fp8, "int8": g.int8}[precision]


def auto_precision(backend: str, sm: tuple[int, int] | None) -> tuple[str, str]:
    """(precision, reason): what `--precision auto` builds for `backend` on a GPU of compute
    capability `sm` (None: no GPU visible)."""
    if backend not in BUILD_BACKENDS:
        raise UserError(f"unknown backend {backend!r}; valid: {', '.join(BUILD_BACKENDS)}")
    if backend == "onnxruntime":
        return "fp32", (
            "fp32 runs on every ONNX Runtime execution provider, CPU included; fp16, bf16, "
            "int8 and fp8 are built when asked for by name"
        )
    if sm is None:
        precision, _ = auto_precision("tensorrt", PLANNING_SM)
        return precision, (
            f"no CUDA GPU is visible, so a --dry-run plans for SM {sm_text(PLANNING_SM)} "
            f"({gpu(PLANNING_SM).name}); a TensorRT build needs the GPU it will run on"
        )
    g = gpu(sm)
    where = f"SM {sm_text(g.sm)} is {g.name} ({g.family})"
    if g.fp8:
        return "fp8", f"{where}: FP8 tensor cores (SM {sm_text(FP8_MIN_SM)}+), so FP8 Q/DQ"
    if g.sm == (8, 7):
        return "int8", (
            f"{where}: no FP8 (it needs SM {sm_text(FP8_MIN_SM)}+); INT8 tensor cores, and a "
            "board is memory-bound, so INT8 Q/DQ"
        )
    return "fp16", (
        f"{where}: no FP8 (it needs SM {sm_text(FP8_MIN_SM)}+), so fp16; INT8 only when asked "
        "for (it needs calibration and is not always faster)"
    )


def resolve_precision(requested: str, sm: tuple[int, int]) -> str:
    """The TensorRT engine precision for a request on a GPU: `auto` or one of `PRECISIONS`.

    `auto` is `auto_precision("tensorrt", sm)`. An explicit precision the GPU cannot run raises
    a UserError (a ValueError) naming the SM, the GPU family and what to use instead.
    """
    _check_precision(requested, REQUESTS)
    g = gpu(sm)
    if requested == "auto":
        return auto_precision("tensorrt", g.sm)[0]
    if not supports(requested, g.sm):
        need = {"fp8": FP8_MIN_SM, "bf16": BF16_MIN_SM, "int8": INT8_MIN_SM}[requested]
        instead = [p for p in _FALLBACKS[requested] if supports(p, g.sm)]
        raise UserError(
            f"precision {requested!r} needs SM {sm_text(need)}+, but SM {sm_text(g.sm)} is "
            f"{g.name} ({g.family}), which has no {requested.upper()}; "
            f"use {' or '.join(instead)} instead (auto picks {resolve_precision('auto', g.sm)})"
        )
    return requested


def _check_precision(precision: str, valid: tuple[str, ...]) -> None:
    if precision not in valid:
        raise UserError(f"unknown precision {precision!r}; valid: {', '.join(valid)}")
