"""Export a training run as a published-layout checkpoint, and its model card.

The run's stage-1 backbone, stage-2 latent queries + DiT and the decoder are assembled into a
`BLIP3o` + `Decoder` and written by `training.checkpoint.save_model` with the tiny tokenizer, so
the folder loads through `load_pipeline` exactly as a 4b/8b checkpoint does. `MODEL_CARD.md` states
the command, the git revision and the stage steps from the run's `run.json`; `python -m training
eval --update-card` fills in its evaluation section.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.checkpoint import save_model
from training.config import from_preset
from training.model.target_encoder import TargetEncoder
from training.train.common import Dist
from training.train.gate import GATE_FILE
from training.train.run import Run, load_decoder, load_model, load_target_encoder
from training.train.stages import DEFAULTS, KNOBS

log = logging.getLogger(__name__)

CARD = "MODEL_CARD.md"
# Training-only, beside the published layout (no loader or exporter reads it): the target encoder
# and its feature statistics, so the features the DiT was trained on can be recomputed
# (`python -m training diagnose --checkpoint`, `decoder-ceiling`) without the run folder.
TARGET_ENCODER_DIR = "target_encoder"
EVAL_START, EVAL_END = "<!-- eval:start -->", "<!-- eval:end -->"


def read_run(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no run.json; is it a training run folder?")
    return json.loads(path.read_text())


def open_run(run_dir: str | Path, seed: int = 0) -> Run:
    """A finished run folder, for loading its stages (default settings; nothing is trained)."""
    return Run(
        out=Path(run_dir), cfg=from_preset("tiny"), seed=seed, dist=Dist(), resume=False,
        settings=dict(DEFAULTS), knobs=dict(KNOBS),
    )  # fmt: skip


def export_checkpoint(run_dir: str | Path, out: str | Path) -> Path:
    """Write the run's trained model as a published-layout checkpoint folder at `out`."""
    run_dir = Path(run_dir)
    record = read_run(run_dir)
    run = open_run(run_dir, record["seed"])
    model = load_model(run, generation=True)
    decoder = load_decoder(run)
    folder = save_model(model, out, tokenizer=run.tokenizer, decoder=decoder)
    save_target_encoder(*load_target_encoder(run), folder / TARGET_ENCODER_DIR)
    gate_path = run_dir / GATE_FILE
    gate = json.loads(gate_path.read_text()) if gate_path.is_file() else None
    (folder / CARD).write_text(model_card(record, folder, gate))
    log.info("exported %s to %s", run_dir, folder)
    return folder


def save_target_encoder(encoder, stats: dict, folder: Path) -> None:
    """`model.safetensors` (the ViT) and `config.json` (its config and feature statistics)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()},
              folder / "model.safetensors")  # fmt: skip
    config = {
        "config": dataclasses.asdict(encoder.config),
        "feature_stats": {k: v.tolist() for k, v in stats.items()},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_target_encoder_folder(folder: str | Path):
    """The (encoder, stats) `save_target_encoder` wrote; a clear error when the folder lacks it."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no target encoder (written by export-checkpoint)")
    config = json.loads((folder / "config.json").read_text())
    encoder = TargetEncoder(from_preset("tiny").target_encoder)
    if json.loads(json.dumps(dataclasses.asdict(encoder.config))) != config["config"]:
        raise ValueError(f"{folder}: the target encoder config differs from the tiny preset's")
    encoder.load_state_dict(load_file(folder / "model.safetensors"))
    stats = {k: torch.tensor(v) for k, v in config["feature_stats"].items()}
    return encoder.eval().requires_grad_(False), stats


def gate_section(gate: dict | None) -> str:
    """The caption-reading gate stage 2 started on (`<run>/gate.json`), for the card."""
    if gate is None:
        return "No gate report in the run folder (trained before the gate existed)."
    verdict = "passed" if gate["passed"] else ("FAILED, forced" if gate.get("forced") else "FAILED")
    return (
        "Caption-reading gate before stage 2 (`python -m training gate`): shape/color separation "
        f"{gate['shape_vs_color']:.3f} (target >= 0.3), relation/color "
        f"{gate['relation_vs_color']:.3f}, count/color {gate['count_vs_color']:.3f}, "
        f"mean-condition shape probe {gate['shape_probe']:.3f} (target >= 0.9, chance "
        f"{gate['shape_probe_chance']:.2f}): {verdict}."
    )


def model_card(record: dict, folder: Path, gate: dict | None = None) -> str:
    stages = record.get("stages", {})
    revisions = sorted({s["git_revision"] for s in stages.values()})
    rows = []
    for stage, info in stages.items():
        for name, loop in info["loops"].items():
            s = loop["settings"]
            rows.append(f"| {stage} | {name} | {loop['steps']} | {s['batch']} | {s['lr']:g} | "
                        f"{loop['seconds_this_run']:.0f} |")  # fmt: skip
    ckpt = folder.as_posix()
    command = record.get("command", "python -m training train --stages all --out runs/tiny")
    return f"""# BLIP3-o tiny (shapes world)

The `tiny` variant of BLIP3-o trained from scratch on the procedural shapes world
(`docs/shapes-world.md`) with BLIP3-o's two-stage recipe: a CLIP-trained target encoder and a
diffusion decoder first, then stage 1 (understanding, Qwen2.5-VL trained) and stage 2 (backbone
frozen; 64 latent queries + NextDiT trained by flow matching on the target features). Published
BLIP3-o layout, written by `training.checkpoint.save_model`; load it with
`training.checkpoint.load_pipeline("{folder.as_posix()}")`.

## Reproduce
```
{command}
python -m training export-checkpoint --run {record.get("out", "runs/tiny")} --out {ckpt}
python -m training eval --checkpoint {ckpt} --out {ckpt}/eval --update-card
```
Trained from git revision(s) {", ".join(revisions) or "unknown"} (`-dirty`: uncommitted changes
in the work tree), seed {record.get("seed")}, steps scale {record.get("steps_scale")}.

| stage | loop | steps | batch | lr | wall s |
|---|---|---|---|---|---|
{chr(10).join(rows)}

{gate_section(gate)}

Feature convention: the DiT generates, and the decoder reads, target-encoder tokens standardized
per channel with statistics of the training images. The target encoder is training-only: no
loader or exporter reads it, but it ships beside the published layout (`{TARGET_ENCODER_DIR}/`:
weights and those statistics) so that the features can be recomputed (`python -m training
diagnose --checkpoint {ckpt}`).

## Evaluation
{EVAL_START}
Not evaluated yet: `python -m training eval --checkpoint {folder.as_posix()} --update-card`.
{EVAL_END}
"""


def update_card(folder: str | Path, section: str) -> None:
    """Replace the evaluation section of a checkpoint's MODEL_CARD.md."""
    path = Path(folder) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; export the checkpoint first")
    text = path.read_text()
    if EVAL_START not in text or EVAL_END not in text:
        raise ValueError(f"{path} has no {EVAL_START} ... {EVAL_END} section to update")
    head, rest = text.split(EVAL_START, 1)
    _, tail = rest.split(EVAL_END, 1)
    path.write_text(f"{head}{EVAL_START}\n{section.strip()}\n{EVAL_END}{tail}")
