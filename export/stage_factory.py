"""The stages of an engine folder build and the manifest entries they produce.

`assets` (host files) and `negative` (the decoder's CFG negative features) first
(`export.host_stages`); per graph: `export:<graph>` always (`export.export_stages`);
`quantize:<graph>` for INT8/FP8 folders and quantizable graphs (`export.quantize_stages`);
`engine:<graph>` with the TensorRT backend (`export.engine_stages`), once every graph's ONNX
passed the TensorRT lint (`export.trt_lint`, run by the build plan). A later stage's key includes
the sha256 of the file the earlier stage produced, so it is computed only once that stage has run.
"""

from __future__ import annotations

from export.build_folder import BuildFolder, Stage
from export.engine_stages import engine_stage
from export.export_stages import export_stage
from export.host_stages import assets_stage, negative_stage
from export.precision import QUANTIZED, onnx_precision, tensorrt_16bit
from export.quantize_stages import Calibration, quantize_stage
from runtime.folder.spec import spec_to_dict


class StageFactory:
    """Builds the stages of one request and turns their records into manifest entries."""

    def __init__(self, request, source, precision, specs, versions, sm, trt, graphs=()) -> None:
        self.request, self.source, self.precision = request, source, precision
        self.specs, self.versions, self.sm, self.trt = specs, versions, sm, trt
        self.graphs = tuple(graphs)  # the graphs of this build (calibration records only theirs)
        self._calibration = Calibration(request, source)

    def quantized(self, name: str) -> bool:
        if self.precision not in QUANTIZED:
            return False
        from export.quantize import QUANTIZABLE  # imports onnx and torch

        return name in QUANTIZABLE

    def graph_precision(self, name: str) -> str:
        """The precision graph `name` is exported and computes in: the folder's for fp32/16-bit
        folders; in INT8/FP8 folders fp32 for the quantized graphs (their Q/DQ source), and for
        the others (text, vision) 16-bit behind float32 I/O with TensorRT (`tensorrt_16bit`:
        half the weight memory of fp32), fp32 with ONNX Runtime."""
        if self.precision in QUANTIZED and not self.quantized(name):
            if self.request.backend == "tensorrt":
                return tensorrt_16bit(self.sm)
        return onnx_precision(self.precision)

    def graph_precisions(self, names) -> dict[str, str]:
        return {n: self.precision if self.quantized(n) else self.graph_precision(n) for n in names}

    def stage_names(self, names) -> list[str]:
        out = ["assets", "negative"]
        for n in names:
            out.append(f"export:{n}")
            if self.quantized(n):
                out.append(f"quantize:{n}")
        if self.request.backend == "tensorrt":  # after every ONNX passed the lint
            out += [f"engine:{n}" for n in names]
        return out

    def preview(self, names, engine: BuildFolder):
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

    def negative(self, engine: BuildFolder) -> Stage:
        return negative_stage(
            self.source, self.precision, self.specs, engine, device=self.request.device
        )

    def export(self, name: str) -> Stage:
        return export_stage(
            name, self.specs[name], self.source, self.precision, self.versions,
            onnx=self.graph_precision(name),
        )  # fmt: skip

    def graph_stages(self, name: str, engine: BuildFolder):
        """Yield the stages that make one graph's ONNX, in order (run each before asking for
        the next); its engine stage is `engine_stage`, after every graph passed the lint."""
        yield self.export(name)
        if self.quantized(name):
            yield self.quantize(name, engine)

    def onnx_path(self, name: str, engine: BuildFolder):
        """The graph's final ONNX in the folder (the export's, or the Q/DQ graph)."""
        return engine.folder / self._onnx_stage(name, engine)["onnx"]

    def calibration_prompts(self) -> tuple[list[str], list[str]]:
        """(calibration prompts, held-out prompts), bounded by the request's count."""
        return self._calibration.prompts()

    def calibration_steps(self) -> tuple[int, int]:
        return self._calibration.steps()

    def calibration_samples(self) -> int:
        """Recorded calls each quantized graph is calibrated on, at most."""
        return self._calibration.samples()

    def calibration(self, engine: BuildFolder) -> dict:
        """Sampler feeds of the build's quantized graphs, and held-out feeds (recorded once)."""
        return self._calibration.feeds(engine, self._quantized_graphs())

    def _quantized_graphs(self) -> tuple[str, ...]:
        return tuple(g for g in self.graphs if self.quantized(g))

    def quantize(self, name: str, engine: BuildFolder) -> Stage:
        return quantize_stage(
            name, engine, self._calibration, precision=self.precision,
            backend=self.request.backend, graphs=self._quantized_graphs(), versions=self.versions,
        )  # fmt: skip

    def engine_stage(self, name: str, engine: BuildFolder) -> Stage:
        return engine_stage(
            name, self.specs[name], self._onnx_stage(name, engine), engine,
            precision=self.precision, sm=self.sm, trt=self.trt,
        )  # fmt: skip

    def _onnx_stage(self, name: str, engine: BuildFolder) -> dict:
        stages = engine.manifest["stages"]
        return stages[f"quantize:{name}"] if self.quantized(name) else stages[f"export:{name}"]

    def graph_entry(self, name: str, engine: BuildFolder) -> dict:
        record = self._onnx_stage(name, engine)
        files = {f["file"]: f for f in record["files"]}
        main = files.pop(record["onnx"])
        entry = {
            **main,
            "external_data": [files[f] for f in sorted(files)],
            "precision": self.graph_precisions([name])[name],
            "spec": spec_to_dict(self.specs[name]),
        }
        if "quantization" in record:
            entry["quantization"] = record["quantization"]
        trt = engine.manifest["stages"].get(f"engine:{name}")
        if self.request.backend == "tensorrt" and trt:
            entry["engine"] = next(f for f in trt["files"] if f["file"] == trt["engine"])
        return entry
