"""The host stages of an engine folder build: `assets` and `negative`.

`assets` writes what the runtime's host side reads besides the graphs: the tokenizer, the token
embedding table and the latent queries, loaded in the host precision. `negative` writes the
decoder's CFG negative features, per `sampler.decoder_negative`: zeros, or the DiT's features of
the blank prompt sampled by the runtime's own loop over the model (`export.model_sessions`). The
manifest's `host` section lists both stages' files (`export.build_folder.host_entries`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from export.build_folder import BuildFolder, Stage, exporter_source_hash, host_entries
from export.model_sessions import ModelGraphs, model_generator
from export.precision import host_precision, onnx_precision
from export.source import calibration_device
from runtime.jobs.generation import blank_prompt_features

log = logging.getLogger(__name__)
NEGATIVE_FILE = "negative_features.npy"


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


def negative_stage(
    source, precision: str, specs: dict, engine: BuildFolder, *, device: str = "auto"
) -> Stage:
    """The decoder's CFG negative, `negative_features.npy` (1, 64, C) float32, per
    `sampler.decoder_negative`: zeros, or the DiT's features of the blank prompt sampled by
    the runtime's own loop over the model (in the graphs' dtype, on the build's `device`)."""
    cfg = source.config
    s, d = cfg.sampler, cfg.dit
    dtype = onnx_precision(precision)

    def run(tmp: Path) -> dict:
        if s.decoder_negative == "zeros":
            negative = np.zeros((1, d.num_tokens, d.in_channels), np.float32)
        else:
            negative = _blank_prompt_features(source, specs, engine, dtype, device)
        np.save(tmp / NEGATIVE_FILE, negative.astype(np.float32))  # (1, 64, C)
        return {}

    key = {"decoder_negative": s.decoder_negative, "shape": [d.num_tokens, d.in_channels]}
    if s.decoder_negative != "zeros":
        key.update(
            checkpoint=source.hash,
            precision=dtype,
            sampler={k: getattr(s, k) for k in ("sampler", "steps", "guidance", "negative_seed")},
            prompt=engine.manifest["template"]["negative_prompt"],
            assets=engine.manifest["stages"]["assets"]["files"],
            code=exporter_source_hash("negative"),
        )
    return Stage("negative", key, run, info={"decoder_negative": s.decoder_negative})


def _blank_prompt_features(
    source, specs: dict, engine: BuildFolder, dtype: str, requested: str
) -> np.ndarray:
    device = calibration_device(requested)
    graphs = ModelGraphs(source, dtype=dtype, device=device)
    log.info("negative: the blank prompt's DiT features (%s, %s)", dtype, device)
    try:
        gen = model_generator(
            engine.folder, engine.manifest, host_entries(engine.manifest, negative=False),
            specs, graphs.open, precision=dtype, device=device,
        )  # fmt: skip
        return blank_prompt_features(gen)
    finally:
        graphs.release()
