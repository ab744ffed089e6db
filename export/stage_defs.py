"""The stages of an engine folder build and the manifest entries they produce.

`assets` (host files) and `negative` (the decoder's CFG negative features) first; per graph:
`export:<graph>` always; `quantize:<graph>` for INT8/FP8 folders and quantizable
graphs; `engine:<graph>` with the TensorRT backend. A later stage's key includes the sha256 of
the file the earlier stage produced, so it is computed only once that stage has run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from export.stages import EngineFolder, Stage, exporter_source_hash
from export.wrappers import graph_module
from runtime.folder.spec import io_dtype, spec_to_dict

log = logging.getLogger(__name__)
QUANTIZED = ("int8", "fp8")
NEGATIVE_FILE = "negative_features.npy"
DEFAULT_PROMPTS = 32  # calibration prompts without a prompt file (ModelOpt: 32-128)
HELD_OUT_PROMPTS = 2  # other prompts and seeds, to measure the Q/DQ error on


def onnx_precision(precision: str) -> str:
    """Precision of the exported ONNX: Q/DQ graphs are made from the fp32 export."""
    return "fp32" if precision in ("fp32", *QUANTIZED) else precision


def host_precision(precision: str) -> str:
    """Dtype the host assets are loaded in: fp16 when the I/O is 16-bit, else fp32."""
    return "fp16" if io_dtype(precision) in ("float16", "bfloat16") else "fp32"


def assets_stage(source, precision: str) -> Stage:
    def run(tmp: Path) -> dict:
        parts = source.load("host", dtype=host_precision(precision))
        lm = parts.model.qwen.model.language_model
        table = lm.embed_tokens.weight.detach().cpu().numpy()  # (V, H), fp16 or fp32
        np.save(tmp / "embeddings.npy", table)
        queries = parts.model.latent_queries.detach().cpu().numpy()  # (1, 64, H)
        np.save(tmp / "latent_queries.npy", queries)
        (tmp / "tokenizer.json").write_text(parts.tokenizer.to_str())
        return {}

    key = {
        "checkpoint": source.hash,
        "precision": precision,
        "code": exporter_source_hash("assets"),
    }
    return Stage("assets", key, run)


def export_stage(name: str, spec, source, precision: str, versions: dict) -> Stage:
    from export.onnx_export import OPSET, export_graph

    p = onnx_precision(precision)
    file = f"{name}.{p}.onnx"

    def run(tmp: Path) -> dict:
        module = graph_module(name, source.for_graph(name, p))
        export_graph(module, spec, tmp / file, precision=p)
        return {}

    key = {
        "checkpoint": source.hash,
        "precision": p,
        "spec": spec_to_dict(spec),
        "tools": {k: versions[k] for k in ("torch", "transformers", "diffusers", "onnxscript")},
        "opset": OPSET,
        "code": exporter_source_hash("export"),
    }
    return Stage(f"export:{name}", key, run, info={"onnx": file})


class StageFactory:
    """Builds the stages of one request and turns their records into manifest entries."""

    def __init__(self, request, source, precision, specs, versions, sm, trt, graphs=()) -> None:
        self.request, self.source, self.precision = request, source, precision
        self.specs, self.versions, self.sm, self.trt = specs, versions, sm, trt
        self.graphs = tuple(graphs)  # the graphs of this build (calibration records only theirs)
        self._calibration = None

    def quantized(self, name: str) -> bool:
        if self.precision not in QUANTIZED:
            return False
        from export.quantize import QUANTIZABLE

        return name in QUANTIZABLE

    def stage_names(self, names) -> list[str]:
        out = ["assets", "negative"]
        for n in names:
            out.append(f"export:{n}")
            if self.quantized(n):
                out.append(f"quantize:{n}")
            if self.request.backend == "tensorrt":
                out.append(f"engine:{n}")
        return out

    def preview(self, names, engine: EngineFolder):
        """(stage name, stage or None when its key needs an earlier stage's output)."""
        yield "assets", self.assets()
        yield "negative", None
        for n in names:
            export = self.export(n)
            yield export.name, export
            later = [
                s for s in self.stage_names([n]) if s not in ("assets", "negative", export.name)
            ]
            for s in later:
                yield s, None

    def assets(self) -> Stage:
        return assets_stage(self.source, self.precision)

    def negative(self, engine: EngineFolder) -> Stage:
        """The decoder's CFG negative, `negative_features.npy` (1, 64, C) float32, per
        `sampler.decoder_negative`: zeros, or the DiT's features of the blank prompt sampled by
        the runtime's own loop over the model (in the graphs' dtype, on the build's device)."""
        cfg = self.source.config
        s, d = cfg.sampler, cfg.dit
        dtype = onnx_precision(self.precision)

        def run(tmp: Path) -> dict:
            if s.decoder_negative == "zeros":
                negative = np.zeros((1, d.num_tokens, d.in_channels), np.float32)
            else:
                negative = self._blank_prompt_features(engine, dtype)
            np.save(tmp / NEGATIVE_FILE, negative.astype(np.float32))  # (1, 64, C)
            return {}

        key = {"decoder_negative": s.decoder_negative, "shape": [d.num_tokens, d.in_channels]}
        if s.decoder_negative != "zeros":
            key.update(
                checkpoint=self.source.hash,
                precision=dtype,
                sampler={
                    k: getattr(s, k) for k in ("sampler", "steps", "guidance", "negative_seed")
                },
                prompt=engine.manifest["template"]["negative_prompt"],
                assets=engine.manifest["stages"]["assets"]["files"],
                code=exporter_source_hash("negative"),
            )
        return Stage("negative", key, run, info={"decoder_negative": s.decoder_negative})

    def _blank_prompt_features(self, engine: EngineFolder, dtype: str) -> np.ndarray:
        from export.model_sessions import ModelGraphs, host_entries, model_generator
        from export.source import calibration_device
        from runtime.jobs.generation import blank_prompt_features

        device = calibration_device(self.request.device)
        graphs = ModelGraphs(self.source, dtype=dtype, device=device)
        log.info("negative: the blank prompt's DiT features (%s, %s)", dtype, device)
        try:
            gen = model_generator(
                engine.folder, engine.manifest, host_entries(engine.manifest, negative=False),
                self.specs, graphs.open, precision=dtype, device=device,
            )  # fmt: skip
            return blank_prompt_features(gen)
        finally:
            graphs.release()

    def export(self, name: str) -> Stage:
        return export_stage(name, self.specs[name], self.source, self.precision, self.versions)

    def graph_stages(self, name: str, engine: EngineFolder):
        """Yield the stages of one graph in order (run each before asking for the next)."""
        yield self.export(name)
        if self.quantized(name):
            yield self.quantize(name, engine)
        if self.request.backend == "tensorrt":
            yield self.engine_stage(name, engine)

    def high_precision(self) -> str:
        """Dtype of a Q/DQ graph's unquantized ops: fp16 for strongly typed TensorRT, else fp32."""
        return "fp16" if self.request.backend == "tensorrt" else "fp32"

    def calibration_prompts(self) -> tuple[list[str], list[str]]:
        """(calibration prompts, held-out prompts), bounded by the request's count."""
        from export.calibration import default_prompts, load_prompts

        path, count = self.request.calibration_prompts, self.request.calibration_count
        prompts = load_prompts(path) if path else default_prompts(count or DEFAULT_PROMPTS)
        prompts = prompts[:count] if count else prompts
        held = [p for p in default_prompts(8, seed=4321) if p not in prompts][:HELD_OUT_PROMPTS]
        return prompts, held

    def calibration_steps(self) -> tuple[int, int]:
        s = self.source.config.sampler
        return tuple(self.request.calibration_steps or (s.steps, s.decoder_steps))

    def calibration(self, engine: EngineFolder) -> dict:
        """Sampler feeds for calibration, and held-out feeds (other prompts, other seed),
        recorded from the runtime's loop over the model (after the `negative` stage)."""
        if self._calibration is None:
            from export.calibration import collect_feed_sets
            from export.model_sessions import calibration_generator
            from export.source import calibration_device

            prompts, held = self.calibration_prompts()
            steps = self.calibration_steps()
            device = calibration_device(self.request.device)
            log.info("calibrating: %d prompts, %d + %d steps, on %s", len(prompts), *steps, device)
            s = self.source.config.sampler
            gen, recorder, graphs = calibration_generator(
                engine.folder, engine.manifest, self.source, device=device
            )
            try:
                self._calibration = collect_feed_sets(
                    gen,
                    recorder,
                    {"feeds": (prompts, 0), "held_out": (held, 100)},
                    steps=steps[0],
                    guidance=s.guidance,
                    decoder_steps=steps[1],
                    decoder_guidance=s.decoder_guidance,
                    graphs=tuple(g for g in self.graphs if self.quantized(g)),
                )
            finally:
                graphs.release()
        return self._calibration

    def _calibration_key(self, engine: EngineFolder) -> dict:
        """What the calibration feeds depend on besides the source: prompts, steps, the
        folder's samplers and guidance, and its decoder negative (the `negative` stage's file)."""
        prompts, held = self.calibration_prompts()
        s = self.source.config.sampler
        negative = engine.manifest["stages"].get("negative", {}).get("files")
        samplers = {k: getattr(s, k) for k in ("sampler", "decoder_sampler", "guidance")}
        samplers["decoder_guidance"] = s.decoder_guidance
        return {"prompts": prompts, "held_out": held, "steps": self.calibration_steps(),
                "samplers": samplers, "negative": negative}  # fmt: skip

    def quantize(self, name: str, engine: EngineFolder) -> Stage:
        from export.quantize import measure_error, quantize_graph

        src = engine.manifest["stages"][f"export:{name}"]
        src_file = src["onnx"]
        file = f"{name}.{self.precision}.onnx"

        def run(tmp: Path) -> dict:
            data = self.calibration(engine)
            report = quantize_graph(
                engine.folder / src_file,
                tmp / file,
                precision=self.precision,
                calibration=data["feeds"][name],
                graph=name,
                high_precision=self.high_precision(),
            )
            report.pop("path", None)
            # a step graph's output is dominated by the latents it carries over: measure its update
            residual = "latents" if name.endswith("_step") else None
            held_out = data["held_out"][name][:: max(1, len(data["held_out"][name]) // 8)]
            error = measure_error(engine.folder / src_file, tmp / file, held_out, residual=residual)
            log.info("%s %s vs fp32 on held-out prompts: %s", name, self.precision, error)
            return {"quantization": {**report, "error_vs_fp32": error}}

        key = {
            "source": src["files"],
            "precision": self.precision,
            "high_precision": self.high_precision(),
            "calibration": self._calibration_key(engine),
            "tools": {k: self.versions[k] for k in ("nvidia-modelopt", "onnxruntime", "onnx")},
            "code": exporter_source_hash("quantize"),
        }
        return Stage(f"quantize:{name}", key, run, info={"onnx": file})

    def engine_stage(self, name: str, engine: EngineFolder) -> Stage:
        from export.trt_build import build_engine
        from export.trt_plan import plan_engines, timing_cache_name

        onnx_stage = self._onnx_stage(name, engine)
        onnx_file = onnx_stage["onnx"]
        sha = next(f["sha256"] for f in onnx_stage["files"] if f["file"] == onnx_file)
        (plan,) = plan_engines(
            {name: self.specs[name]},
            {name: {"file": onnx_file, "sha256": sha}},
            precision=self.precision,
            sm=self.sm,
            trt_version=self.trt,
            graphs=[name],
        )
        cache = engine.folder / timing_cache_name(self.trt, self.sm)

        def run(tmp: Path) -> None:
            build_engine(
                plan, engine.folder / onnx_file, tmp / plan.engine_file, timing_cache=cache
            )

        return Stage(
            f"engine:{name}",
            {"plan_key": plan.cache_key},
            run,
            info={"engine": plan.engine_file},
        )

    def _onnx_stage(self, name: str, engine: EngineFolder) -> dict:
        stages = engine.manifest["stages"]
        return stages[f"quantize:{name}"] if self.quantized(name) else stages[f"export:{name}"]

    def graph_entry(self, name: str, engine: EngineFolder) -> dict:
        record = self._onnx_stage(name, engine)
        files = {f["file"]: f for f in record["files"]}
        main = files.pop(record["onnx"])
        entry = {
            **main,
            "external_data": [files[f] for f in sorted(files)],
            "precision": self.precision if self.quantized(name) else onnx_precision(self.precision),
            "spec": spec_to_dict(self.specs[name]),
        }
        if "quantization" in record:
            entry["quantization"] = record["quantization"]
        trt = engine.manifest["stages"].get(f"engine:{name}")
        if self.request.backend == "tensorrt" and trt:
            entry["engine"] = next(f for f in trt["files"] if f["file"] == trt["engine"])
        return entry
