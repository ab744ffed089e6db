"""A training run's shared state: its folder, config, seeds, and the finished stages it loads.

A run folder holds one checkpoint per loop (`target_encoder.pt`, `decoder_vae.pt`,
`decoder_unet.pt`, `understanding.pt`, `generation.pt`, each with a `.jsonl` of its metrics) and
`run.json`, the record of what was trained with which command at which git revision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.config import ModelConfig, to_dict
from training.data.shapes import EVAL_SEED_OFFSET, sample_scene
from training.model.blip3o import BLIP3o
from training.model.decoder import Decoder
from training.model.target_encoder import TargetEncoder
from training.tokenizer import build_tiny_tokenizer
from training.train.common import (
    Dist,
    Loop,
    StageSettings,
    final_weights,
    run_loop,
    scene_batch,
    step_generator,
)
from training.train.state import flat_fingerprint, load_final

log = logging.getLogger(__name__)

# Every optimization loop, in training order; the index namespaces its seeds.
LOOPS = ("target_encoder", "decoder_vae", "decoder_unet", "understanding", "generation")
LOOP_INDEX = {name: i + 1 for i, name in enumerate(LOOPS)}


@dataclass
class Run:
    """What every stage of one run shares."""

    out: Path
    cfg: ModelConfig
    seed: int
    dist: Dist
    resume: bool
    settings: dict[str, StageSettings]
    knobs: dict[str, dict]
    stop_at: int | None = None  # stop each loop early (tests of resuming)
    evals: bool = True  # periodic evaluation (off in smoke tests)
    wait_upstream_s: float = 0.0  # wait for a stage another process of the run is training
    stat_images: int = 512  # images for the feature and latent statistics
    force_gate: bool = False  # start stage 2 on a failed caption-reading gate

    def __post_init__(self) -> None:
        self.tokenizer = build_tiny_tokenizer()

    def path(self, loop: str) -> Path:
        return self.out / f"{loop}.pt"

    def fingerprint(self, loop: str) -> dict:
        return flat_fingerprint(
            model=to_dict(self.cfg), settings=dataclasses.asdict(self.settings[loop]),
            knobs=self.knobs.get(loop, {}), seed=self.seed, world_size=self.dist.world,
        )  # fmt: skip

    def scenes(self, loop: str, step: int, batch: int | None = None, *, shared: bool = False):
        """This rank's scenes of a step (`shared`: the same on every rank)."""
        n = self.settings[loop].batch if batch is None else batch
        return scene_batch(self.seed, LOOP_INDEX[loop], step, Dist() if shared else self.dist, n)

    def generator(self, loop: str, step: int) -> torch.Generator:
        return step_generator(self.seed, LOOP_INDEX[loop], step, self.dist.rank)

    def run(self, loop: Loop) -> dict:
        if not self.evals:
            loop.evaluate = None
        return run_loop(loop, self.dist, resume=self.resume, stop_at=self.stop_at)


def held_out_scenes(n: int, seed: int = 0) -> list:
    """Scenes from the evaluation seed namespace (never drawn by a training stream)."""
    rng = np.random.default_rng(EVAL_SEED_OFFSET + 10_000 + seed)
    return [sample_scene(rng) for _ in range(n)]


# ---------------------------------------------------------------- finished stages


def load_target_encoder(run: Run) -> tuple[TargetEncoder, dict]:
    """The trained target encoder (frozen) and its feature statistics {"mean", "std"}: (W,)."""
    state = load_final(run.path("target_encoder"), "this stage", run.wait_upstream_s)
    encoder = TargetEncoder(run.cfg.target_encoder)
    weights = state["model"]["objective"]  # the CLIP objective: encoder.* is the ViT
    encoder.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("encoder.")})
    stats = {k: torch.tensor(v) for k, v in state["extra"]["feature_stats"].items()}
    return encoder.eval().requires_grad_(False), stats


def load_decoder(run: Run) -> Decoder:
    """The trained pixel decoder (standardized VAE + UNet), frozen."""
    decoder = Decoder(run.cfg.decoder)
    decoder.load_state_dict(
        final_weights(load_final(run.path("decoder_unet"), "this stage"), "decoder")
    )
    return decoder.eval().requires_grad_(False)


def decoder_ready(run: Run) -> bool:
    path = run.path("decoder_unet")
    with contextlib.suppress(Exception):
        return path.is_file() and bool(load_final(path, "eval").get("done"))
    return False


def load_model(run: Run, *, generation: bool) -> BLIP3o:
    """BLIP3o with the stage-1 backbone and queries (with `generation`, stage 2's queries + DiT)."""
    torch.manual_seed(run.seed)
    model = BLIP3o(run.cfg)
    stage1 = load_final(run.path("understanding"), "this stage")["model"]
    model.qwen.load_state_dict(stage1["qwen"])
    with torch.no_grad():  # the queries stage 1's caption rows trained
        model.latent_queries.copy_(stage1["reading"]["queries"])
    if generation:
        model.load_state_dict(final_weights(load_final(run.path("generation"), "export"), "model"))
    return model.eval()


# ---------------------------------------------------------------- run.json


def git_revision() -> str:
    """`git rev-parse HEAD`, with `-dirty` when the work tree has changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
        return rev + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record_run(run: Run, results: dict, steps_scale: float, command: str, revision: str) -> None:
    """Merge what the stages of `results` did into `<run>/run.json` (locked: chains share it).

    `revision` is the git revision the training process started from.
    """
    run.out.mkdir(parents=True, exist_ok=True)
    path = run.out / "run.json"
    with open(run.out / ".run.json.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = json.loads(path.read_text()) if path.is_file() else {"stages": {}}
        record.update(seed=run.seed, steps_scale=steps_scale, out=run.out.as_posix())
        if command:
            record["command"] = command  # the latest; every distinct one is kept in "commands"
            record.setdefault("commands", [])
            if command not in record["commands"]:
                record["commands"].append(command)
        for stage, res in results.items():
            record["stages"][stage] = {
                "git_revision": revision,
                "world_size": run.dist.world,
                "wall_seconds": round(res["wall_seconds"], 1),
                "loops": {
                    name: {
                        "steps": loop["step"], "done": loop["done"],
                        "seconds_this_run": round(loop["seconds"], 1), "eval": loop["eval"],
                        "settings": dataclasses.asdict(run.settings[name]),
                        "knobs": run.knobs.get(name, {}),
                    }
                    for name, loop in res["loops"].items()
                },
            }  # fmt: skip
        path.write_text(json.dumps(record, indent=2, default=float) + "\n")
