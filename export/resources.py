"""What each build stage costs the machine, estimated before it runs and measured while it runs.

A user with a 4b/8b checkpoint on a GPU box needs to know before starting whether the build fits
(host memory, disk) and how long calibration will take. `--dry-run` prints, per stage, the
component it loads, its estimated peak resident memory and the bytes it adds to the folder, and
the calibration's cost (prompts x steps x forwards, feed memory), all from parameter counts
(`count_params`, on `meta`: no memory) and the graph specs, with the overhead factors below
measured at reduced depth (README, "Building 4B/8B on a GPU"). Everything except `count_params`
and the RSS meter is plain arithmetic on plain data, unit-tested.

While a build runs, `peak_rss` measures each stage's own peak resident memory (Linux: the
process's high-water mark, reset before the stage through `/proc/self/clear_refs`, after the
heap earlier stages freed is handed back with `malloc_trim`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import math
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from export.components import COMPONENTS
from export.precision import host_precision, onnx_precision
from runtime.folder.spec import GraphSpec, numpy_dtype, resolve_shape

log = logging.getLogger(__name__)

GB = 1 << 30
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "fp8": 1}
# Resident memory of the build process before any weight is loaded (Python, torch, onnx, ORT,
# the exporter's machinery): measured 1.0 GB (4b widths at 1 layer, benchmarks/reduced_depth.py).
BASE_BYTES = int(1.0 * GB)
# Peak of an export over its component's loaded weights, per byte of the ONNX it writes: the
# exporter wraps the torch weights without copying them (measured 0.2-0.3 at 4b widths: UNet,
# DiT, VAE, vision tower) ...
EXPORT_COPIES = 0.3
# ... plus, for the text graphs, copies of the vocabulary-sized LM head (151,668 x H) while its
# matmul is folded and serialized (measured 3.1 for prefill and decode at 4b widths, 1 layer).
HEAD_COPIES = 3.0
TEXT_GRAPHS = ("prefill", "decode")
# Peak of a quantization over the fp32 graph: the loaded graph, ModelOpt's Q/DQ copy and ORT's
# calibration session (on paper: not measured at real widths).
QUANTIZE_COPIES = 4.0
# Peak of calibration over its largest phase's component in fp32 (the component, the bf16 file
# pages read to load it, activations): measured 1.5 at 4b widths, 1 layer (text phase, CPU).
CALIBRATION_COPIES = 1.5
# Peak of a TensorRT build over the ONNX size: parser weights + builder copy (on paper).
ENGINE_COPIES = 2.0


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a variant: per loadable component, per graph, and the host assets."""

    components: dict[str, int]  # export.components.COMPONENTS name -> parameters it loads
    graphs: dict[str, int]  # graph -> parameters its ONNX holds
    host: int  # token embedding table + latent queries
    head: int = 0  # the LM head (vocabulary x hidden), inside prefill and decode


@dataclass(frozen=True)
class StageCost:
    stage: str
    loads: str  # what the stage loads, e.g. "dit fp32", or "-"
    peak_bytes: int
    disk_bytes: int
    loaded_bytes: int = 0  # of peak_bytes, the weights it loads (a held pipeline already has)


@dataclass(frozen=True)
class CalibrationCost:
    """What calibrating the Q/DQ graphs costs (`collect_feed_sets`, stage by stage)."""

    prompts: int
    held_out: int
    dit_steps: int
    unet_steps: int
    negative_steps: int  # the decoder negative, sampled once with the sampler's steps
    runs_unet: bool
    device: str
    feed_bytes: int  # recorded feeds held in host memory
    peak_component_bytes: int  # the largest phase's component, fp32
    host_staging_bytes: int  # what passes through host memory: on cuda only the UNet (diffusers
    # loads it on the host first; the backbone and DiT stream to the GPU tensor by tensor)
    samples: dict[str, tuple[int, int]] | None = None  # graph -> (calls the quantizer runs,
    # calls recorded)

    @property
    def prefills(self) -> int:  # and the blank prompt's, where the negative is sampled
        return self.prompts + self.held_out + (1 if self.negative_steps else 0)

    @property
    def dit_forwards(self) -> int:  # each at CFG batch 2
        return (self.prompts + self.held_out) * self.dit_steps + self.negative_steps

    @property
    def unet_forwards(self) -> int:  # each at CFG batch 2
        return (self.prompts + self.held_out) * self.unet_steps if self.runs_unet else 0

    def describe(self) -> str:
        n = self.prompts + self.held_out
        unet = f", {self.unet_forwards:,} UNet" if self.runs_unet else ""
        text = (
            f"calibration: {self.prompts} + {self.held_out} held-out prompts x ({self.dit_steps} "
            f"DiT + {self.unet_steps if self.runs_unet else 0} UNet steps): {self.prefills} "
            f"prefills, {self.dit_forwards:,} DiT{unet} forwards at CFG batch 2, in fp32 on "
            f"{self.device}; feeds {_gb(self.feed_bytes)} in host memory ({n} trajectories); "
            f"largest component {_gb(self.peak_component_bytes)} on {self.device}"
        )
        if self.samples:
            each = ", ".join(f"{g} {k:,} of {n:,}" for g, (k, n) in self.samples.items())
            text += (
                f"; the quantizer calibrates each graph in ONNX Runtime on CPU on its recorded "
                f"calls spread over every step and prompt (--calibration-samples): {each}"
            )
        return text


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def feed_bytes(spec: GraphSpec) -> int:
    """Bytes of one recorded calibration feed of a graph (batch 1: `batch` 1, `cfg_batch` 2)."""
    total = 0
    for t in spec.inputs:
        shape = resolve_shape(t, {"batch": 1, "cfg_batch": 2})
        total += math.prod(shape) * numpy_dtype(t.dtype).itemsize  # float feeds are float32
    return total


def calibration_cost(
    specs: dict[str, GraphSpec],
    graphs: list[str],
    params: ParamCounts,
    *,
    prompts: int,
    held_out: int,
    steps: tuple[int, int],
    negative_steps: int,
    device: str,
    max_samples: int | None = None,
) -> CalibrationCost:
    """The cost of calibrating `graphs` (the quantized ones) on `prompts` + `held_out` prompts;
    the quantizer runs at most `max_samples` of each graph's recorded calls."""
    n = prompts + held_out
    per_prompt = {"dit": steps[0], "dit_step": steps[0], "unet": steps[1], "unet_step": steps[1]}
    recorded = {g: prompts * per_prompt.get(g, 1) for g in graphs}
    samples = {g: (min(k, max_samples or k), k) for g, k in recorded.items()}
    feeds = sum(feed_bytes(specs[g]) * n * per_prompt.get(g, 1) for g in graphs)
    runs_unet = bool({"unet", "unet_step", "vae_decoder"} & set(graphs))
    phases = (
        ["lm", "dit"]
        + (["unet"] if runs_unet else [])
        + (["vae"] if "vae_decoder" in graphs else [])
    )  # export.components.CALIBRATION_PHASES, those this calibration runs
    largest = max(params.components[c] for c in phases) * BYTES["fp32"]
    unet = params.components["unet"] * BYTES["fp32"] if runs_unet else 0
    staging = largest if device == "cpu" else unet
    return CalibrationCost(
        prompts, held_out, *steps, negative_steps, runs_unet, device, feeds, largest, staging,
        samples,
    )  # fmt: skip


def stage_costs(
    stage_names: list[str],
    params: ParamCounts,
    *,
    precision: str,
    graph_components: dict[str, str],
    calibration: CalibrationCost | None = None,
    graph_precisions: dict[str, str] | None = None,
) -> list[StageCost]:
    """Estimated peak resident memory and bytes added to the folder, per stage.
    `graph_precisions`: the precision each graph is exported in, where it is not the folder's
    ONNX precision (the 16-bit text graphs of an INT8/FP8 TensorRT folder)."""
    folder_onnx, host = onnx_precision(precision), host_precision(precision)
    graph_precisions = graph_precisions or {}
    quantized = {n.partition(":")[2] for n in stage_names if n.startswith("quantize:")}
    out, calibrated = [], False
    for name in stage_names:
        kind, _, graph = name.partition(":")
        if kind == "assets":
            size = params.host * BYTES[host]
            out.append(StageCost(name, f"host {host}", BASE_BYTES + size, size, size))
            continue
        if kind == "negative":  # the text decoder, then the DiT (blank_prompt)
            loaded = max(params.components[c] for c in ("lm", "dit")) * BYTES[folder_onnx]
            out.append(StageCost(name, f"lm, dit {folder_onnx}", BASE_BYTES + loaded, 0, loaded))
            continue
        onnx = graph_precisions.get(graph, folder_onnx)
        if kind == "export":
            comp = graph_components[graph]
            loaded = params.components[comp] * BYTES[onnx]
            size = params.graphs[graph] * BYTES[onnx]
            peak = BASE_BYTES + loaded + int(EXPORT_COPIES * size)
            if graph in TEXT_GRAPHS:
                peak += int(HEAD_COPIES * params.head * BYTES[onnx])
            out.append(StageCost(name, f"{comp} {onnx}", peak, size, loaded))
        elif kind == "quantize":
            source = params.graphs[graph] * BYTES["fp32"]
            peak = BASE_BYTES + int(QUANTIZE_COPIES * source)
            loads, loaded = "-", 0
            if calibration is not None and not calibrated:  # calibration runs in the first one
                calibrated = True
                staging = int(CALIBRATION_COPIES * calibration.host_staging_bytes)
                if BASE_BYTES + staging > peak:
                    peak, loaded = BASE_BYTES + staging, calibration.host_staging_bytes
                peak += 2 * calibration.feed_bytes
                loads = f"calibration ({calibration.device})"
            elif calibration is not None:
                peak += 2 * calibration.feed_bytes
            size = params.graphs[graph] * BYTES[precision]
            out.append(StageCost(name, loads, peak, size, loaded))
        elif kind == "engine":  # the engine holds the weights at its ONNX's precision
            size = params.graphs[graph] * BYTES[precision if graph in quantized else onnx]
            out.append(StageCost(name, "-", BASE_BYTES + int(ENGINE_COPIES * size), size))
        else:
            kinds = "assets, negative, export, quantize, engine"
            raise ValueError(f"unknown stage {name!r}; kinds: {kinds}")
    return out


def held_by_every_stage(costs: list[StageCost], held_bytes: int) -> list[StageCost]:
    """The costs when `held_bytes` of weights stay in memory through the whole build (the
    seeded random pipeline, built at once): each stage's peak is its own work on top of them,
    the weights it would load being among them."""
    return [
        dataclasses.replace(c, peak_bytes=c.peak_bytes - c.loaded_bytes + held_bytes) for c in costs
    ]


def count_params(cfg) -> ParamCounts:
    """Parameter counts of a config's components and graphs, from `meta`-built modules."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from training.checkpoint import LM_HEAD, empty_model
    from training.model.decoder import unet_kwargs, vae_kwargs

    names = {n: t.numel() for n, t in empty_model(cfg).state_dict(keep_vars=True).items()}
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_kwargs(cfg.decoder))
        vae = AutoencoderKL(**vae_kwargs(cfg.decoder))
    decoder = {"unet": _numel(unet.parameters()), "vae": _numel(vae.parameters())}

    def under(*prefixes) -> int:
        return sum(n for k, n in names.items() if k.startswith(prefixes))

    components = {
        c: under(*prefixes) + sum(decoder[p] for p in parts)
        for c, (prefixes, parts, _) in COMPONENTS.items()
    }
    lm = under("qwen.model.language_model.layers.", "qwen.model.language_model.norm.", LM_HEAD)
    vae_decoder = sum(
        p.numel() for n, p in vae.named_parameters() if n.startswith(("decoder.", "post_quant"))
    )
    graphs = {
        **{"vision": under("qwen.model.visual."), "prefill": lm, "decode": lm},
        **{"dit": under("dit."), "dit_step": under("dit.")},
        **{"unet": decoder["unet"], "unet_step": decoder["unet"], "vae_decoder": vae_decoder},
    }
    host = under("qwen.model.language_model.embed_tokens.", "latent_queries")
    return ParamCounts(components, graphs, host, names[LM_HEAD])


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def format_costs(costs: list[StageCost]) -> list[str]:
    """Table rows: stage, what it loads, peak RAM, added disk; then the totals."""
    rows = [f"{c.loads:<22} {_gb(c.peak_bytes):>9} {_gb(c.disk_bytes):>9}" for c in costs]
    peak = max(costs, key=lambda c: c.peak_bytes)
    disk = sum(c.disk_bytes for c in costs)
    total = f"peak host memory {_gb(peak.peak_bytes)} ({peak.stage}); folder {_gb(disk)}"
    return [*rows, total]


# ---------------------------------------------------------------- measured while building

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _high_water_mark() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Return freed heap to the OS (glibc `malloc_trim`), where there is such a call."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def peak_rss(stage: str) -> Iterator[dict]:
    """Measure a block's time and peak resident memory; the yielded dict gets `peak_bytes`,
    `scope` and `seconds` after it (and the log record carries them as attributes).

    Resets the kernel's high-water mark first (Linux `clear_refs` 5), which also resets what
    `getrusage` and `time -v` report for the process afterwards: measure a whole build from
    outside by sampling, or read these per-stage figures. Where the reset is not possible,
    reports the process's peak so far (`ru_maxrss`), labelled as such.
    """
    result: dict = {}
    gc.collect()
    _trim_heap()  # what earlier stages freed is returned, not counted as this stage's
    try:
        _CLEAR_REFS.write_text("5")
        scope = "stage"
    except OSError:
        scope = "process"
    start = time.perf_counter()
    try:
        yield result
    finally:
        seconds = time.perf_counter() - start
        peak = _high_water_mark() if scope == "stage" else None
        if peak is None:
            peak, scope = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process"
        result.update(peak_bytes=peak, scope=scope, seconds=seconds)
        log.info(
            "%s: %.1f s, peak RSS %s (%s peak)",
            stage,
            seconds,
            _gb(peak),
            scope,
            extra={"stage": stage, **result},
        )
