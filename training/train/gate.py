"""The gate before stage 2: does the stage-1 backbone read captions into the DiT's condition?

Stage 2 freezes the backbone, so whatever the condition at the 64 query positions does not carry,
the DiT can never draw. The probe measures it on fixed caption sets (no images, seconds on a CPU):

- separation ratios: the mean L2 distance between the (flattened) conditions of captions that differ
  only in one attribute, over the same for captions that differ only in color: shape ("a red circle"
  / "a red square"), relation ("... to the left of ..." / "... above ..."), count ("two ..." /
  "three ..."), color (1 by definition);
- a linear shape probe on the mean condition over the queries: a ridge classifier of the first
  named object's shape, fitted on captions of every form and scored on distinct held-out ones.

`check_gate` compares with GATE_TARGETS; `train_generation` refuses to start on a failed gate
unless forced (`--force-gate`), and `python -m training gate --run RUN` prints the report.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch

from training.data.shapes import (
    COLORS,
    RELATIONS,
    SHAPES,
    format_caption,
    parse_caption,
    sample_spec,
)
from training.model.blip3o import BLIP3o
from training.train.backbone import conditioning, generation_prompt_batch

GATE_TARGETS = {"shape_vs_color": 0.3, "shape_probe": 0.9}
GATE_FILE = "gate.json"


class GateError(RuntimeError):
    """Stage 2 would start on a backbone that does not read captions."""


def _two(names):
    return itertools.combinations(names, 2)


def _pairs(kind: str) -> list[tuple[str, str]]:
    """Caption pairs differing only in `kind` (color, shape, relation or count)."""
    if kind == "color":
        return [
            (f"a {a} {s}", f"a {b} {s}")
            for s in SHAPES
            for a, b in itertools.combinations(COLORS, 2)
        ]
    if kind == "shape":
        return [
            (f"a {c} {a}", f"a {c} {b}")
            for c in COLORS
            for a, b in itertools.combinations(SHAPES, 2)
        ]
    if kind == "count":
        words = ("two", "three", "four")
        return [(f"{a} {c} {s}s", f"{b} {c} {s}s") for c in COLORS for s in SHAPES
                for a, b in _two(words)]  # fmt: skip
    if kind == "relation":
        objects = [(c, s) for c in COLORS for s in SHAPES]
        rng = np.random.default_rng(0)
        pairs = []
        for i in rng.choice(len(objects) * len(objects), size=24, replace=False):
            (c1, s1), (c2, s2) = objects[i // len(objects)], objects[i % len(objects)]
            if (c1, s1) == (c2, s2):
                continue
            for r1, r2 in _two(RELATIONS):
                pairs.append((f"a {c1} {s1} {r1} a {c2} {s2}", f"a {c1} {s1} {r2} a {c2} {s2}"))
        return pairs
    raise ValueError(f"unknown attribute {kind!r}; expected color, shape, relation or count")


@torch.no_grad()
def conditions(model: BLIP3o, tokenizer, captions: list[str], batch: int = 64) -> np.ndarray:
    """The stage-2 condition of each caption: (N, 64, H) float64."""
    out = []
    for start in range(0, len(captions), batch):
        prompts = generation_prompt_batch(tokenizer, model.config, captions[start : start + batch])
        out.append(conditioning(model, prompts["input_ids"], prompts["prompt_mask"]).double())
    return torch.cat(out).numpy()


def _ridge_accuracy(x_fit, y_fit, x_test, y_test, classes: int, alpha: float = 1e-2) -> float:
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-8
    a, b = (x_fit - mean) / std, (x_test - mean) / std
    a, b = np.hstack([a, np.ones((len(a), 1))]), np.hstack([b, np.ones((len(b), 1))])
    target = np.eye(classes)[y_fit]
    w = np.linalg.solve(a.T @ a + alpha * len(a) * np.eye(a.shape[1]), a.T @ target)
    return float(((b @ w).argmax(1) == y_test).mean())


def probe(model: BLIP3o, tokenizer, *, probe_captions: int = 900) -> dict:
    """The gate's figures for a model (its backbone and latent queries)."""
    model = model.eval()
    distances = {}
    for kind in ("color", "shape", "relation", "count"):
        pairs = _pairs(kind)
        cond = conditions(model, tokenizer, [c for pair in pairs for c in pair])
        diff = (cond[0::2] - cond[1::2]).reshape(len(pairs), -1)
        distances[kind] = float(np.linalg.norm(diff, axis=1).mean())
    rng = np.random.default_rng(12345)
    captions = sorted({format_caption(sample_spec(rng)) for _ in range(probe_captions * 3)})
    order = rng.permutation(len(captions))[:probe_captions]
    captions = [captions[i] for i in order]
    labels = np.array([SHAPES.index(parse_caption(c)["objects"][0][1]) for c in captions])
    mean = conditions(model, tokenizer, captions).mean(1)  # (N, H)
    fit = len(captions) * 2 // 3
    accuracy = _ridge_accuracy(mean[:fit], labels[:fit], mean[fit:], labels[fit:], len(SHAPES))
    color = max(distances["color"], 1e-12)
    return {
        "shape_vs_color": distances["shape"] / color,
        "relation_vs_color": distances["relation"] / color,
        "count_vs_color": distances["count"] / color,
        "shape_probe": accuracy,
        "shape_probe_chance": float(np.bincount(labels[fit:]).max() / (len(labels) - fit)),
        "distances": distances,
        "captions": {"fit": fit, "held_out": len(captions) - fit},
    }


def check_gate(report: dict) -> list[str]:
    """The failed targets of a probe report, as one-line reasons (empty: the gate passes)."""
    return [
        f"{key} {report[key]:.3f} < {target}"
        for key, target in GATE_TARGETS.items()
        if not report[key] >= target
    ]


def format_gate(report: dict) -> str:
    failed = check_gate(report)
    lines = [
        f"shape/color separation     {report['shape_vs_color']:.3f} (target >= "
        f"{GATE_TARGETS['shape_vs_color']})",
        f"relation/color separation  {report['relation_vs_color']:.3f}",
        f"count/color separation     {report['count_vs_color']:.3f}",
        f"mean-condition shape probe {report['shape_probe']:.3f} (target >= "
        f"{GATE_TARGETS['shape_probe']}; chance {report['shape_probe_chance']:.2f}; "
        f"{report['captions']['fit']} fit / {report['captions']['held_out']} held-out captions)",
        "gate: " + ("passed" if not failed else "FAILED (" + "; ".join(failed) + ")"),
    ]
    return "\n".join(lines)


def gate_run(model: BLIP3o, tokenizer, out: Path, *, force: bool) -> dict:
    """Probe, write `<run>/gate.json`, and raise GateError on a failed gate unless `force`."""
    report = probe(model, tokenizer)
    report["passed"] = not check_gate(report)
    report["forced"] = bool(force and not report["passed"])
    out.mkdir(parents=True, exist_ok=True)
    (out / GATE_FILE).write_text(json.dumps(report, indent=2) + "\n")
    if not report["passed"] and not force:
        raise GateError(
            "the stage-1 backbone fails the gate before stage 2 "
            f"({'; '.join(check_gate(report))}); "
            f"see {out / GATE_FILE}, retrain stage 1, or pass --force-gate to train stage 2 anyway"
        )
    return report
