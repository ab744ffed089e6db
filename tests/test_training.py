"""Training: every stage for a few steps, export + load + eval, resuming, torchrun with 2 ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.train.common import StageSettings
from training.train.recipe import parse_stages, train
from training.train.stages import DEFAULTS, STAGES
from training.train.state import ResumeError

pytestmark = pytest.mark.slow  # trains

ROOT = Path(__file__).resolve().parents[1]


def tiny_settings(steps: int = 2) -> dict[str, StageSettings]:
    batch = {"target_encoder": 8, "decoder_vae": 2, "decoder_unet": 4, "understanding": 4}
    return {
        name: dataclasses.replace(
            DEFAULTS[name], steps=steps, batch=batch.get(name, 2), warmup=1, save_every=2
        )
        for name in DEFAULTS
    }


KNOBS = {"generation": {"repeats": 2}, "decoder_vae": {"crop": 16}}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, dict]:
    """Every stage for 2 steps on tiny batches (evaluations off; stage 2 forced past the gate)."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("run")
    results = train(
        out=out, stages=list(STAGES), settings=tiny_settings(), knobs=KNOBS, evals=False,
        stat_images=16, command="pytest", force_gate=True,
    )  # fmt: skip
    return out, results


def test_every_stage_trains_and_records(smoke_run):
    out, results = smoke_run
    assert set(results) == set(STAGES)
    for loop in ("target_encoder", "decoder_vae", "decoder_unet", "understanding", "generation"):
        state = torch.load(out / f"{loop}.pt", weights_only=False)
        assert state["step"] == 2 and state["done"], loop
        assert np.isfinite(state["metrics"]["train"]["loss"]), loop
    record = json.loads((out / "run.json").read_text())
    assert set(record["stages"]) == set(STAGES) and record["command"] == "pytest"
    stats = torch.load(out / "target_encoder.pt", weights_only=False)["extra"]["feature_stats"]
    assert len(stats["mean"]) == len(stats["std"]) == 32
    gate = json.loads((out / "gate.json").read_text())  # probed before stage 2's first step
    assert {"shape_vs_color", "shape_probe", "passed"} <= set(gate)
    assert gate["forced"] is (not gate["passed"])
    assert "reading" in torch.load(out / "understanding.pt", weights_only=False)["model"]
    ema = torch.load(out / "generation.pt", weights_only=False)["ema"]["model"]
    assert "latent_queries" in ema and not any(k.startswith("qwen.") for k in ema)


def test_stage2_refuses_a_backbone_that_fails_the_gate(smoke_run, tmp_path, monkeypatch):
    import shutil

    from training.__main__ import main
    from training.train import gate

    real = gate.probe
    monkeypatch.setattr(gate, "probe", lambda *a, **k: {**real(*a, **k), "shape_probe": 0.5})
    run, _ = smoke_run
    for name in ("target_encoder.pt", "understanding.pt"):
        shutil.copy(run / name, tmp_path / name)
    with pytest.raises(gate.GateError, match="fails the gate before stage 2"):
        train(out=tmp_path, stages=["generation"], settings=tiny_settings(), knobs=KNOBS,
              evals=False, resume=True)  # fmt: skip
    assert not (tmp_path / "generation.pt").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["gate", "--run", str(tmp_path), "--threads", "1"])
    assert exit_info.value.code == 1


def test_export_loads_through_load_pipeline_and_evaluates(smoke_run, tmp_path):
    from training.__main__ import main
    from training.checkpoint import load_pipeline

    run, _ = smoke_run
    ckpt = tmp_path / "ckpt"
    main(["export-checkpoint", "--run", str(run), "--out", str(ckpt)])
    assert (ckpt / "diffusion-decoder" / "unet").is_dir() and (ckpt / "tokenizer.json").is_file()
    card = (ckpt / "MODEL_CARD.md").read_text()
    assert "python -m training" in card and "Caption-reading gate before stage 2" in card
    pipe = load_pipeline(ckpt)
    image = pipe.generate("a red circle", seed=0, steps=2, decoder_steps=2)
    assert np.asarray(image).shape == (64, 64, 3)
    assert isinstance(pipe.answer(np.asarray(image), "Describe the image.", max_new_tokens=3), str)
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(ckpt), "--out", str(out), "--per-task", "1"]
    main([*argv, "--questions", "2", "--steps", "2", "--decoder-steps", "2", "--update-card"])
    report = json.loads((out / "eval.json").read_text())
    assert 0 <= report["geneval"]["overall"] <= 1 and report["understanding"]["n"] == 2
    assert (out / "geneval_grid.png").is_file()
    assert "understanding exact-match" in (ckpt / "MODEL_CARD.md").read_text()


def test_resume_continues_the_step_count(tmp_path):
    settings = tiny_settings(steps=4)
    kwargs = dict(
        out=tmp_path, stages=["target_encoder"], settings=settings, evals=False, stat_images=16
    )
    first = train(**kwargs, stop_at=2)["target_encoder"]["loops"]["target_encoder"]
    assert (first["start_step"], first["step"], first["done"]) == (0, 2, False)
    with pytest.raises(ResumeError, match="--resume"):
        train(**kwargs)
    again = train(**kwargs, resume=True)["target_encoder"]["loops"]["target_encoder"]
    assert (again["start_step"], again["step"], again["done"]) == (2, 4, True)
    state = torch.load(tmp_path / "target_encoder.pt", weights_only=False)
    assert state["step"] == 4 and state["scheduler"]["last_epoch"] == 4


def test_resume_with_another_config_is_a_clear_error(tmp_path):
    settings = tiny_settings(steps=4)
    train(out=tmp_path, stages=["target_encoder"], settings=settings, evals=False, stop_at=1)
    other = {**settings, "target_encoder": dataclasses.replace(settings["target_encoder"], lr=0.5)}
    with pytest.raises(ResumeError, match=r"settings\.lr: checkpoint 0\.002, now 0\.5"):
        train(out=tmp_path, stages=["target_encoder"], settings=other, evals=False, resume=True)
    with pytest.raises(ResumeError, match="seed"):
        train(out=tmp_path, stages=["target_encoder"], settings=settings, evals=False, resume=True,
              seed=1)  # fmt: skip


def test_corrupted_or_missing_checkpoints_are_clear_errors(tmp_path):
    (tmp_path / "target_encoder.pt").write_bytes(b"not a checkpoint")
    settings = tiny_settings()
    with pytest.raises(ResumeError, match="cannot read training checkpoint"):
        train(out=tmp_path, stages=["target_encoder"], settings=settings, evals=False, resume=True)
    with pytest.raises(FileNotFoundError, match="train that stage first"):
        train(out=tmp_path / "empty", stages=["generation"], settings=settings, evals=False)


def test_parse_stages():
    assert parse_stages("all") == list(STAGES)
    assert parse_stages("generation,target_encoder") == ["target_encoder", "generation"]
    with pytest.raises(ValueError, match="unknown stage"):
        parse_stages("decoder,vae")


def test_batched_generate_matches_generate(tiny_pipeline):
    from training.train.evaluate import batched_generate

    fast = dict(steps=2, guidance=3.0, decoder_steps=2, decoder_guidance=3.0)
    requests = [("a red circle", 0), ("two blue squares", 1), ("a red circle", 1)]
    images = batched_generate(tiny_pipeline, requests, **fast, batch=2)
    for prompt, seed in requests:
        single = np.asarray(tiny_pipeline.generate(prompt, seed=seed, **fast)).astype(int)
        assert np.abs(images[prompt, seed].astype(int) - single).max() <= 1


def test_standardized_latents_decode_the_same(tiny_config):
    from training.model.decoder import Decoder
    from training.train.encoders import decoder_latents, standardize_latents

    torch.manual_seed(0)
    decoder = Decoder(tiny_config.decoder).eval()
    images = torch.rand(8, 3, 64, 64)
    with torch.no_grad():
        before = decoder.decode_latents(decoder_latents(decoder, images))
        standardize_latents(decoder, images)
        latents = decoder_latents(decoder, images)
        after = decoder.decode_latents(latents)
    assert torch.allclose(before, after, atol=1e-4)
    assert latents.mean().abs() < 1e-3 and (latents.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3


def test_torchrun_two_process_generation_smoke(smoke_run, tmp_path):
    """2 gloo processes, DDP over the latent queries + DiT, a few steps from the CLI."""
    run, _ = smoke_run
    for name in ("target_encoder", "understanding"):
        (tmp_path / f"{name}.pt").write_bytes((run / f"{name}.pt").read_bytes())
    scale = 3 / DEFAULTS["generation"].steps  # 3 steps of the CLI's default recipe
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(29500 + os.getpid() % 1000), "-m", "training", "train",
        "--stages", "generation", "--out", str(tmp_path), "--steps-scale", repr(scale), "--no-eval",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "generation.pt", weights_only=False)
    assert state["done"] and state["step"] == 3 and state["fingerprint"]["world_size"] == 2
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["command"].startswith("torchrun --nproc_per_node 2")


def test_unet_batch_repeats_each_image_in_a_row(tiny_config):
    from training.data.shapes import sample_scene
    from training.model.decoder import Decoder
    from training.model.target_encoder import TargetEncoder
    from training.train.encoders import unet_batch

    torch.manual_seed(0)
    decoder = Decoder(tiny_config.decoder).eval()
    encoder = TargetEncoder(tiny_config.target_encoder)
    stats = {"mean": torch.zeros(32), "std": torch.ones(32)}
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng), sample_scene(rng)]
    g = torch.Generator().manual_seed(0)
    batch = unet_batch(decoder, encoder, stats, scenes, 0.0, g, repeats=3)
    latents, feats = batch["latents"], batch["features"]
    assert latents.shape[0] == feats.shape[0] == 6
    assert torch.equal(latents[0], latents[2]) and torch.equal(feats[3], feats[5])
    assert not torch.equal(latents[2], latents[3])


def test_min_snr_weights_the_per_sample_loss(tiny_config):
    from training.train.encoders import UnetObjective, ddpm_scheduler

    class ZeroEps(torch.nn.Module):
        def epsilon(self, latents, t, features):
            return torch.zeros_like(latents)

    scheduler = ddpm_scheduler(tiny_config)
    latents, features = torch.randn(64, 4, 16, 16), torch.randn(64, 64, 32)

    def loss(gamma: float) -> float:
        objective = UnetObjective(ZeroEps(), scheduler, p_uncond=0.0, min_snr_gamma=gamma)
        return float(objective(latents, features, torch.Generator().manual_seed(3))[0])

    g = torch.Generator().manual_seed(3)  # the objective's draws, in its order
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (64,), generator=g)
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    assert (snr > 5).any() and (snr < 5).any()
    per_sample = (noise**2).mean(dim=(1, 2, 3))
    assert loss(0) == pytest.approx(float(per_sample.mean()), rel=1e-5)
    weighted = per_sample * snr.clamp(max=5.0) / snr
    assert loss(5.0) == pytest.approx(float(weighted.mean()), rel=1e-5)
    assert loss(5.0) < loss(0)  # the draws with SNR > 5 are down-weighted


def test_decoder_ceiling_judges_oracle_scenes(smoke_run):
    """Structure on the smoke run; the judging itself on true renders (all pass) and blanks."""
    from training.eval.geneval import TASKS, make_prompts, scene_for_prompt
    from training.train.ceiling import decoder_ceiling, judge, to_table
    from training.train.common import images_tensor

    out, _ = smoke_run
    result = decoder_ceiling(out, per_task=1, seeds=(0,), decoder_steps=2, decoder_guidance=3.0)
    assert set(result) == {"vae", "decoder", "decoder_steps", "decoder_guidance"}
    assert (result["decoder_steps"], result["decoder_guidance"]) == (2, 3.0)
    for scores in (result["vae"], result["decoder"]):
        assert set(scores) == {*TASKS, "overall"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert "overall" in to_table(result)
    prompts = make_prompts(0, 2)
    rng = np.random.default_rng(0)
    keys = list(dict.fromkeys((p.prompt, 0) for p in prompts))
    truth = images_tensor([scene_for_prompt(prompt, rng) for prompt, _ in keys])
    assert judge(prompts, (0,), dict(zip(keys, truth)))["overall"] == 1.0
    assert judge(prompts, (0,), dict(zip(keys, torch.ones_like(truth))))["overall"] == 0.0


def test_decoder_ceiling_needs_a_trained_run(tmp_path):
    from training.train.ceiling import decoder_ceiling

    with pytest.raises(Exception, match="target_encoder"):
        decoder_ceiling(tmp_path, per_task=1, seeds=(0,))
    with pytest.raises(ValueError, match="per_task"):
        decoder_ceiling(tmp_path, per_task=0)
