"""Per-stage memory and disk estimates, calibration cost, parameter counts and the RSS meter."""

from __future__ import annotations

import numpy as np
import pytest

from export import resources as r
from export.components import COMPONENTS, GRAPH_COMPONENT
from export.dims import graph_dims
from runtime.folder.graphs import graph_specs
from training.config import from_preset

GB = r.GB
PARAMS = r.ParamCounts(
    components={"host": 100, "vision": 10, "lm": 300, "text": 400, "dit": 50, "unet": 80,
                "vae": 20},
    graphs={"vision": 10, "prefill": 300, "decode": 300, "dit": 50, "dit_step": 50, "unet": 80,
            "unet_step": 80, "vae_decoder": 12},
    host=100,
    head=90,
)  # fmt: skip


def _by_stage(costs):
    return {c.stage: c for c in costs}


def test_export_loads_one_component_in_the_onnx_precision():
    stages = ["assets", "export:prefill", "export:dit_step"]
    fp32 = _by_stage(
        r.stage_costs(stages, PARAMS, precision="fp32", graph_components=GRAPH_COMPONENT)
    )
    fp16 = _by_stage(
        r.stage_costs(stages, PARAMS, precision="fp16", graph_components=GRAPH_COMPONENT)
    )
    assert fp32["export:prefill"].loads == "lm fp32" and fp16["export:dit_step"].loads == "dit fp16"
    head = int(r.HEAD_COPIES * 90 * 4)  # the text graphs' vocabulary-sized head
    assert fp32["export:prefill"].peak_bytes == r.BASE_BYTES + 300 * 4 + int(0.3 * 300 * 4) + head
    assert fp32["export:dit_step"].peak_bytes == r.BASE_BYTES + 50 * 4 + int(0.3 * 50 * 4)
    assert fp32["export:prefill"].disk_bytes == 1200 and fp16["export:prefill"].disk_bytes == 600
    assert fp16["assets"].disk_bytes == 200 and fp32["assets"].disk_bytes == 400
    int8 = _by_stage(
        r.stage_costs(stages, PARAMS, precision="int8", graph_components=GRAPH_COMPONENT)
    )
    assert int8["export:dit_step"].loads == "dit fp32"  # Q/DQ graphs come from the fp32 export


def test_quantize_and_engine_costs_and_calibration_once():
    specs = graph_specs(graph_dims(from_preset("tiny")))
    cal = r.calibration_cost(specs, ["dit_step", "unet_step"], PARAMS, prompts=4, held_out=2,
                             steps=(3, 5), negative_steps=30, device="cuda")  # fmt: skip
    stages = ["export:dit_step", "quantize:dit_step", "engine:dit_step", "quantize:unet_step"]
    costs = _by_stage(r.stage_costs(stages, PARAMS, precision="fp8",
                                    graph_components=GRAPH_COMPONENT, calibration=cal))  # fmt: skip
    assert costs["quantize:dit_step"].loads == "calibration (cuda)"
    assert costs["quantize:unet_step"].loads == "-"
    assert costs["quantize:dit_step"].disk_bytes == 50  # 1-byte weights
    assert costs["engine:dit_step"].disk_bytes == 50
    assert costs["quantize:unet_step"].peak_bytes == r.BASE_BYTES + 4 * 80 * 4 + 2 * cal.feed_bytes
    assert (cal.prefills, cal.dit_forwards, cal.unet_forwards) == (7, 6 * 3 + 30, 6 * 5)
    assert cal.peak_component_bytes == 300 * 4  # the text decoder (lm) is the largest phase here
    assert cal.host_staging_bytes == 80 * 4  # on cuda only the UNet passes through the host
    on_cpu = r.calibration_cost(specs, ["dit_step"], PARAMS, prompts=4, held_out=2, steps=(3, 5),
                                negative_steps=30, device="cpu")  # fmt: skip
    assert on_cpu.host_staging_bytes == 300 * 4 and not on_cpu.runs_unet
    assert "4 + 2 held-out prompts x (3 DiT + 5 UNet steps)" in cal.describe()
    capped = r.calibration_cost(specs, ["dit_step", "unet_step", "vae_decoder"], PARAMS,
                                prompts=4, held_out=2, steps=(3, 5), negative_steps=0,
                                device="cpu", max_samples=16)  # fmt: skip
    assert capped.samples == {"dit_step": (12, 12), "unet_step": (16, 20), "vae_decoder": (4, 4)}
    assert "dit_step 12 of 12, unet_step 16 of 20, vae_decoder 4 of 4" in capped.describe()


def test_a_pipeline_held_by_every_stage_is_in_every_peak():
    """Random weights: the whole pipeline stays loaded, so a stage's peak is its own work on
    top of it (the component it loads is part of it), and the headline is the largest peak."""
    specs = graph_specs(graph_dims(from_preset("tiny")))
    cal = r.calibration_cost(specs, ["dit_step"], PARAMS, prompts=4, held_out=2, steps=(3, 5),
                             negative_steps=0, device="cpu")  # fmt: skip
    stages = ["assets", "negative", "export:prefill", "export:dit_step", "quantize:dit_step"]
    own = r.stage_costs(stages, PARAMS, precision="int8", graph_components=GRAPH_COMPONENT,
                        calibration=cal)  # fmt: skip
    held = 10 * GB
    costs = _by_stage(r.held_by_every_stage(own, held))
    for c in own:
        assert costs[c.stage].peak_bytes == c.peak_bytes - c.loaded_bytes + held
    assert costs["export:prefill"].peak_bytes - held == (
        r.BASE_BYTES + int(0.3 * 300 * 4) + int(r.HEAD_COPIES * 90 * 4)
    )  # the export's copies only: the text decoder itself is in the held pipeline
    *_, headline = r.format_costs(list(costs.values()))
    top = max(costs.values(), key=lambda c: c.peak_bytes)
    assert headline.startswith(f"peak host memory {top.peak_bytes / GB:.1f} GB ({top.stage})")


def test_feed_bytes_come_from_the_spec():
    cfg = from_preset("tiny")
    specs = graph_specs(graph_dims(cfg))
    c, s, h = cfg.dit.in_channels, cfg.dit.input_size, cfg.backbone.hidden_size
    latents, cond = c * s * s * 4, 64 * h * 4
    # latents and the sampler state (prev_velocity), cond, the timestep, three float scalars
    assert r.feed_bytes(specs["dit_step"]) == 2 * latents + cond + 8 + 3 * 4
    assert r.feed_bytes(specs["dit"]) == 2 * latents + 2 * 8 + 2 * cond  # CFG batch 2


def test_count_params_matches_the_modules(tiny_pipeline):
    counts = r.count_params(tiny_pipeline.config)
    m, dec = tiny_pipeline.model, tiny_pipeline.decoder
    numel = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert counts.components["dit"] == counts.graphs["dit_step"] == numel(m.dit)
    assert counts.components["unet"] == numel(dec.unet) and counts.components["vae"] == numel(
        dec.vae
    )
    assert counts.components["vision"] == numel(m.qwen.model.visual)
    lm = m.qwen.model.language_model
    assert counts.graphs["prefill"] == numel(lm) - lm.embed_tokens.weight.numel() + (
        m.qwen.lm_head.weight.numel()
    )
    assert counts.host == lm.embed_tokens.weight.numel() + m.latent_queries.numel()
    assert counts.head == m.qwen.lm_head.weight.numel()
    assert set(counts.components) == set(COMPONENTS)


def test_count_params_at_4b_matches_the_published_dit():
    counts = r.count_params(from_preset("4b"))
    assert counts.graphs["dit"] == 1_362_257_824  # docs/architecture.md
    assert 3.0e9 < counts.components["lm"] < 3.2e9  # Qwen2.5-VL-3B's text decoder, tied head


def _rss() -> int:
    line = next(x for x in open("/proc/self/status") if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_peak_rss_sees_a_block_allocation():
    with r.peak_rss("test") as first:
        block = np.ones(300 << 20, np.uint8)  # 300 MB
        del block
    assert first["peak_bytes"] >= 300 << 20 and first["seconds"] >= 0
    if first["scope"] == "stage":  # the high-water mark was reset: a quiet block peaks at ~RSS
        with r.peak_rss("quiet") as quiet:
            pass
        assert quiet["peak_bytes"] <= _rss() + (64 << 20)


@pytest.mark.slow
def test_an_exported_modules_weights_are_freed(tmp_path, tiny_config):
    """onnxscript's rewrite rules keep the last graph they matched: its weights must not stay."""
    import gc
    import weakref

    from export.onnx_export import export_graph
    from export.wrappers.generation import DiTStepGraph
    from training.model.dit import NextDiTCrossAttn

    dit = NextDiTCrossAttn(tiny_config.dit).eval()
    weight = weakref.ref(dit.norm_out.linear_2.weight)
    spec = graph_specs(graph_dims(tiny_config))["dit_step"]
    export_graph(DiTStepGraph(dit), spec, tmp_path / "dit_step.onnx")
    del dit
    gc.collect()
    assert weight() is None


def test_unknown_stage_kind():
    with pytest.raises(ValueError, match="unknown stage 'link:dit'"):
        r.stage_costs(["link:dit"], PARAMS, precision="fp32", graph_components=GRAPH_COMPONENT)
