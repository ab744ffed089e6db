"""The `quantize:<graph>` stage: INT8/FP8 Q/DQ of an exported fp32 graph, and its calibration.

The feeds a graph is calibrated on are recorded once per build, on first use (after the
`negative` stage: the loop reads the folder's decoder negative), from the runtime's own loop over
the PyTorch model (`export.model_sessions.calibration_generator`, `export.calibration`), and are
shared by the build's quantize stages. Each stage measures its Q/DQ graph's error against the
fp32 graph on held-out prompts and records it in the manifest. The key holds the exported
graph's files, the precision, the high precision of the unquantized ops, what the calibration
feeds depend on, the tools and our exporter's source.
"""

from __future__ import annotations

import logging
from pathlib import Path

from export import build_log
from export.build_folder import BuildFolder, Stage, exporter_source_hash
from export.calibration import collect_feed_sets, default_prompts, load_prompts
from export.model_sessions import calibration_generator
from export.source import calibration_device

log = logging.getLogger(__name__)
DEFAULT_PROMPTS = 32  # calibration prompts without a prompt file (ModelOpt: 32-128)
HELD_OUT_PROMPTS = 2  # other prompts and seeds, to measure the Q/DQ error on
# Recorded calls each graph is calibrated on, spread evenly over (step, prompt) so every step
# keeps its share. ModelOpt runs one ONNX Runtime inference per sample with every activation
# as an output, then a histogram per tensor: it was most of a tiny INT8 build (960 DiT and 1,600
# UNet samples: 61 s and 89 s here). Measured at tiny over 32 prompts, held-out error against
# fp32 (mean cosine of 60 DiT / 100 UNet held-out calls): 0.9766 / 0.9759 with every call,
# 0.9766 / 0.9760 with 256, 0.9762 / 0.9761 with 128; fewer prompts cost more than fewer
# samples (16 prompts, 256 samples: 0.9760 / 0.9755).
DEFAULT_SAMPLES = 256


def high_precision(backend: str) -> str:
    """Dtype of a Q/DQ graph's unquantized ops: fp16 for strongly typed TensorRT, else fp32."""
    return "fp16" if backend == "tensorrt" else "fp32"


class Calibration:
    """The calibration feeds of one build request, recorded on first use and then kept."""

    def __init__(self, request, source) -> None:
        self.request, self.source = request, source
        self._feeds = None

    def prompts(self) -> tuple[list[str], list[str]]:
        """(calibration prompts, held-out prompts), bounded by the request's count."""
        path, count = self.request.calibration_prompts, self.request.calibration_count
        prompts = load_prompts(path) if path else default_prompts(count or DEFAULT_PROMPTS)
        prompts = prompts[:count] if count else prompts
        held = [p for p in default_prompts(8, seed=4321) if p not in prompts][:HELD_OUT_PROMPTS]
        return prompts, held

    def steps(self) -> tuple[int, int]:
        s = self.source.config.sampler
        return tuple(self.request.calibration_steps or (s.steps, s.decoder_steps))

    def samples(self) -> int:
        """Recorded calls each graph is calibrated on, at most (spread over every step)."""
        return self.request.calibration_samples or DEFAULT_SAMPLES

    def feeds(self, engine: BuildFolder, graphs: tuple[str, ...]) -> dict:
        """Sampler feeds of `graphs` (the quantized ones) for calibration, and held-out feeds
        (other prompts, other seed), recorded from the runtime's loop over the model (after the
        `negative` stage)."""
        if self._feeds is None:
            prompts, held = self.prompts()
            steps = self.steps()
            device = calibration_device(self.request.device)
            log.info("calibrating: %d prompts, %d + %d steps, on %s", len(prompts), *steps, device)
            s = self.source.config.sampler
            gen, recorder, model_graphs = calibration_generator(
                engine.folder, engine.manifest, self.source, device=device
            )
            try:
                self._feeds = collect_feed_sets(
                    gen,
                    recorder,
                    {"feeds": (prompts, 0), "held_out": (held, 100)},
                    steps=steps[0],
                    guidance=s.guidance,
                    decoder_steps=steps[1],
                    decoder_guidance=s.decoder_guidance,
                    graphs=graphs,
                    max_samples={"feeds": self.samples()},  # spread over every step
                    progress=build_log.progress(0, "call", "calibration").advance,
                )
            finally:
                model_graphs.release()
        return self._feeds

    def key(self, engine: BuildFolder) -> dict:
        """What the calibration feeds depend on besides the source: prompts, steps, the
        folder's samplers and guidance, and its decoder negative (the `negative` stage's file)."""
        prompts, held = self.prompts()
        s = self.source.config.sampler
        negative = engine.manifest["stages"].get("negative", {}).get("files")
        samplers = {k: getattr(s, k) for k in ("sampler", "decoder_sampler", "guidance")}
        samplers["decoder_guidance"] = s.decoder_guidance
        return {"prompts": prompts, "held_out": held, "steps": self.steps(),
                "samples": self.samples(), "samplers": samplers,
                "negative": negative}  # fmt: skip


def quantize_stage(
    name: str,
    engine: BuildFolder,
    calibration: Calibration,
    *,
    precision: str,
    backend: str,
    graphs: tuple[str, ...],
    versions: dict,
) -> Stage:
    """Graph `name`'s Q/DQ stage over its `export:` stage's graph; `graphs` are the build's
    quantized graphs (calibration records them all at once)."""
    from export.quantize import measure_error, quantize_graph  # imports onnx and torch

    src = engine.manifest["stages"][f"export:{name}"]
    src_file = src["onnx"]
    file = f"{name}.{precision}.onnx"
    high = high_precision(backend)

    def run(tmp: Path) -> dict:
        data = calibration.feeds(engine, graphs)
        samples = data["feeds"][name]
        bar = build_log.progress(len(samples), "sample", "quantizer")
        report = quantize_graph(
            engine.folder / src_file,
            tmp / file,
            precision=precision,
            calibration=samples,
            graph=name,
            high_precision=high,
            on_sample=bar.update,
        )
        report.pop("path", None)
        # a step graph's output is dominated by the latents it carries over: measure its update
        residual = "latents" if name.endswith("_step") else None
        held_out = data["held_out"][name][:: max(1, len(data["held_out"][name]) // 8)]
        error = measure_error(engine.folder / src_file, tmp / file, held_out, residual=residual)
        log.info("%s %s vs fp32 on held-out prompts: %s", name, precision, error)
        return {"quantization": {**report, "error_vs_fp32": error}}

    key = {
        "source": src["files"],
        "precision": precision,
        "high_precision": high,
        "calibration": calibration.key(engine),
        "tools": {k: versions[k] for k in ("nvidia-modelopt", "onnxruntime", "onnx")},
        "code": exporter_source_hash("quantize"),
    }
    return Stage(f"quantize:{name}", key, run, info={"onnx": file})
