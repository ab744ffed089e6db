"""Where generation fails, measured stage by stage (`python -m training diagnose`).

A trained pipeline turns a prompt into target features (the DiT) and features into pixels (the
decoder). mini-GenEval says how often the result is right; this says why it is wrong:

- `taxonomy`: every generated mini-GenEval image judged by the detector for what is wrong with it
  (an asked object missing, an extra object, an asked shape in the wrong color, the wrong count,
  the asked relation not holding, off-palette ink), per task.
- `probes`: what the target representation encodes, by linear probes trained on true features of
  fresh scenes: each token's 8x8-pixel cell (background or which color), the scene's object count
  and, for relation scenes, the relation. The cell probe then reads the DiT's generated features:
  objects in feature space (connected cells of one color) vs objects in the decoded image separate
  the DiT's mistakes from the decoder's.
- `manifold`: the DiT's generated features against true features of scenes for the same prompts:
  per-channel mean and spread, token norms, and the DiT's own x0 error on true features at a few
  noise levels (how far from the truth its one-step prediction lands).
- `fragility`: the decoder painting true features with Gaussian noise added (in standardized units),
  judged as mini-GenEval judges, at noise levels around the DiT's error.

Everything runs on a run folder's target encoder (training-only) and either the same run's DiT and
decoder or a published checkpoint's (`--checkpoint`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.data.shapes import COLORS, IMAGE_SIZE, RELATIONS, SHAPES, sample_scene, shape_mask
from training.eval.detect import Detection, classify_pixels, components, detect
from training.eval.geneval import (
    TASKS,
    check,
    check_strict,
    make_prompts,
    passes,
    scene_for_prompt,
)
from training.flow import NUM_TRAIN_TIMESTEPS, add_noise, host_noise
from training.model.blip3o import BLIP3o
from training.pipeline import ReferencePipeline, to_pil
from training.train import encoders as enc
from training.train.common import images_tensor, mix_seed
from training.train.evaluate import batched_generate

log = logging.getLogger(__name__)

GRID = 8  # the feature grid: 8x8 tokens, each an 8x8-pixel cell of the 64x64 image
CELL = IMAGE_SIZE // GRID
BACKGROUND = len(COLORS)  # the cell probe's class for "no ink"
INK_MIN_DISTANCE = 60.0  # a pixel farther than this from white is ink
# an image whose ink is more than this off-palette is smeared: ~3x the off-palette edge ink of
# the decoder's images from true features (0.047 on checkpoints/tiny; 0.05 flagged half of those)
SMEAR_FRACTION = 0.15
FAILURES = ("missing", "extra", "miscolored", "miscount", "misplaced", "smeared")


# ---------------------------------------------------------------- image failures


def off_palette_fraction(image: np.ndarray) -> float:
    """Fraction of the ink (pixels farther than 60 from white) that matches no palette color."""
    ink = np.sqrt(((image.astype(np.float32) - 255.0) ** 2).sum(-1)) > INK_MIN_DISTANCE
    if not ink.any():
        return 0.0
    return float((classify_pixels(image)[ink] < 0).mean())


def failures(task: str, spec: dict, image: np.ndarray) -> list[str]:
    """What is wrong with one image for its prompt (empty when nothing is): FAILURES' names."""
    found = detect(image)
    objects = spec["objects"]
    asked = spec["count"] if task == "counting" else len(objects)
    wrong = []
    shapes_there = {d.shape for d in found}
    if any(shape not in shapes_there for _, shape in objects):
        wrong.append("missing")
    if len(found) > asked:
        wrong.append("extra")
    if any(
        color is not None
        and shape in shapes_there
        and not any(d.shape == shape and d.color == color for d in found)
        for color, shape in objects
    ):
        wrong.append("miscolored")
    if task == "counting" and sum(d.shape == objects[0][1] for d in found) != spec["count"]:
        wrong.append("miscount")
    if task == "position" and "missing" not in wrong and not check(task, spec, image):
        both = all(any(d.shape == s and d.color == c for d in found) for c, s in objects)
        if both:
            wrong.append("misplaced")
    if off_palette_fraction(image) > SMEAR_FRACTION:
        wrong.append("smeared")
    return wrong


def taxonomy(judged: dict[str, list[tuple[dict, np.ndarray]]]) -> dict:
    """Per task: pass rates (GenEval's rules, strict) and the fraction of images with each failure,
    from {task: [(spec, image), ...]}."""
    table = {}
    for task, items in judged.items():
        flags = [failures(task, spec, image) for spec, image in items]
        n = len(items)
        row = {
            "images": n,
            "geneval": sum(check(task, s, im) for s, im in items) / n,
            "strict": sum(check_strict(task, s, im) for s, im in items) / n,
        }
        row.update({name: sum(name in f for f in flags) / n for name in FAILURES})
        row["objects_mean"] = float(np.mean([len(detect(im)) for _, im in items]))
        row["off_palette_mean"] = float(np.mean([off_palette_fraction(im) for _, im in items]))
        table[task] = row
    return table


# ---------------------------------------------------------------- probes on the target tokens


def cell_labels(images: torch.Tensor) -> torch.Tensor:
    """(B, 64) class of each 8x8 cell: the palette color covering most of it, or BACKGROUND when
    fewer than a quarter of its pixels are ink."""
    out = []
    for img in images:
        pixels = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        cls = classify_pixels(pixels)  # (64, 64)
        cells = cls.reshape(GRID, CELL, GRID, CELL).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
        row = []
        for c in cells:
            ink = c[c >= 0]
            row.append(np.bincount(ink).argmax() if ink.size >= CELL * CELL // 4 else BACKGROUND)
        out.append(row)
    return torch.tensor(out, dtype=torch.long)


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> torch.nn.Linear:
    """A multinomial logistic regression (weight decay 1e-3) fitted with L-BFGS."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    probe.norm = (mean, std)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe((x - mean) / std), y) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def predict(probe: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    mean, std = probe.norm
    with torch.no_grad():
        return probe((x - mean) / std).argmax(-1)


def feature_objects(cells: torch.Tensor) -> int:
    """Objects in an (64,) cell-class map: 4-connected groups of cells of one color (the
    detector's `components` over the 8x8 grid)."""
    grid = cells.view(GRID, GRID).numpy()
    return sum(len(components(grid == c)) for c in np.unique(grid) if c != BACKGROUND)


def probe_targets(encoder, stats, *, train: int = 3000, test: int = 600, seed: int = 7) -> dict:
    """Linear probes of the standardized target tokens; returns accuracies and the cell probe."""
    rng = np.random.default_rng(mix_seed(seed, 1))
    scenes = [sample_scene(rng) for _ in range(train + test)]
    images = images_tensor(scenes)
    feats = torch.cat([enc.normalized_features(encoder, stats, x) for x in images.split(256)])
    cells = cell_labels(images)  # (N, 64)
    tr, te = slice(0, train), slice(train, train + test)
    d = feats.shape[-1]

    cell_probe = fit_linear(feats[tr].reshape(-1, d), cells[tr].reshape(-1), BACKGROUND + 1)
    cell_pred = predict(cell_probe, feats[te].reshape(-1, d)).view(test, -1)
    ink = cells[te] != BACKGROUND
    count = torch.tensor([len(s.objects) for s in scenes]) - 1  # 0..3
    flat = feats.reshape(len(scenes), -1)
    pooled = feats.mean(1)
    count_flat = fit_linear(flat[tr], count[tr], 4)
    count_pooled = fit_linear(pooled[tr], count[tr], 4)
    rel_idx = [i for i, s in enumerate(scenes) if s.form == "relation"]
    rel_y = torch.tensor([RELATIONS.index(_relation(scenes[i].caption)) for i in rel_idx])
    split = int(0.8 * len(rel_idx))
    rel_probe = fit_linear(flat[rel_idx[:split]], rel_y[:split], len(RELATIONS))
    rel_acc = (predict(rel_probe, flat[rel_idx[split:]]) == rel_y[split:]).float().mean()
    objects_true = [len(s.objects) for s in scenes[train:]]
    objects_read = [feature_objects(row) for row in cell_pred]
    return {
        "cell_accuracy": float((cell_pred == cells[te]).float().mean()),
        "cell_accuracy_ink": float((cell_pred[ink] == cells[te][ink]).float().mean()),
        "cell_majority_baseline": float((cells[te] == BACKGROUND).float().mean()),
        "count_accuracy_tokens": float((predict(count_flat, flat[te]) == count[te]).float().mean()),
        "count_accuracy_pooled": float(
            (predict(count_pooled, pooled[te]) == count[te]).float().mean()
        ),
        "relation_accuracy_tokens": float(rel_acc),
        "relation_test_scenes": len(rel_idx) - split,
        "feature_objects_exact": float(
            np.mean([a == b for a, b in zip(objects_true, objects_read)])
        ),
        "cell_probe": cell_probe,
    }


def _relation(caption: str) -> str:
    return next(r for r in RELATIONS if f" {r} " in caption)


# ---------------------------------------------------------------- objects read from features


def object_cells(scenes) -> torch.Tensor:
    """(B, 64) class of each 8x8 cell: 1 + color * 3 + shape of the object covering at least a
    quarter of it (the most), or 0 for none; shapes in SHAPES order."""
    out = torch.zeros(len(scenes), GRID * GRID, dtype=torch.long)
    for i, scene in enumerate(scenes):
        best = np.zeros(GRID * GRID)
        for obj in scene.objects:
            mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
            x0, y0, x1, y1 = obj.box
            mask[y0:y1, x0:x1] = shape_mask(obj.shape, obj.size)
            cover = mask.reshape(GRID, CELL, GRID, CELL).sum((1, 3)).flatten()  # (64,)
            take = (cover >= CELL * CELL // 4) & (cover > best)
            cls = 1 + COLORS.index(obj.color) * len(SHAPES) + SHAPES.index(obj.shape)
            out[i, torch.from_numpy(take)] = cls
            best = np.where(take, cover, best)
    return out


class FeatureReader:
    """Objects read from standardized target features, without the decoder: a small MLP reads
    each token with its 3x3 neighbourhood and classifies its cell (none, or the color and shape
    of the object covering it); 4-connected cells of one color are an object whose shape is its
    cells' majority. The judges (`geneval.passes`) then score the objects as they score an
    image's detections."""

    def __init__(self, encoder, stats, *, scenes: int = 3000, seed: int = 7, epochs: int = 4):
        rng = np.random.default_rng(mix_seed(seed, 2))
        train = [sample_scene(rng) for _ in range(scenes)]
        images = images_tensor(train)
        feats = torch.cat([enc.normalized_features(encoder, stats, x) for x in images.split(256)])
        x, y = neighbourhoods(feats), object_cells(train).flatten()
        classes = 1 + len(COLORS) * len(SHAPES)
        torch.manual_seed(seed)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, classes)
        )
        opt = torch.optim.Adam(self.mlp.parameters(), 2e-3)
        g = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            for _ in range(epochs):
                for idx in torch.randperm(len(y), generator=g).split(1024):
                    loss = F.cross_entropy(self.mlp(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()

    def cells(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, 64, C) features -> (N, 64) cell classes."""
        with torch.no_grad():
            return self.mlp(neighbourhoods(feats)).argmax(-1).view(feats.shape[0], -1)

    def objects(self, feats: torch.Tensor) -> list[list[Detection]]:
        return [read_objects(row) for row in self.cells(feats)]


def neighbourhoods(feats: torch.Tensor) -> torch.Tensor:
    """(N, 64, C) -> (N*64, 9C): each token with its 3x3 neighbours on the grid (zeros outside)."""
    n, _, c = feats.shape
    grid = feats.transpose(1, 2).reshape(n, c, GRID, GRID)
    patches = F.unfold(grid, kernel_size=3, padding=1)  # (N, 9C, 64)
    return patches.transpose(1, 2).reshape(n * GRID * GRID, 9 * c)


def read_objects(cells: torch.Tensor) -> list[Detection]:
    """Detections (pixel coordinates) from one (64,) map of `object_cells` classes: the
    detector's `components` of each color's cells, shaped by their cells' majority."""
    grid = cells.view(GRID, GRID).numpy()
    color_of = np.where(grid > 0, (grid - 1) // len(SHAPES), -1)
    found = []
    for color in range(len(COLORS)):
        for members in components(color_of == color):
            ys, xs = members // GRID, members % GRID
            shapes = (grid[ys, xs] - 1) % len(SHAPES)
            found.append(Detection(
                color=COLORS[color],
                shape=SHAPES[np.bincount(shapes).argmax()],
                area=len(members) * CELL * CELL,
                bbox=(int(xs.min()) * CELL, int(ys.min()) * CELL,
                      int(xs.max() + 1) * CELL, int(ys.max() + 1) * CELL),
                centroid=(float((xs.mean() + 0.5) * CELL), float((ys.mean() + 0.5) * CELL)),
            ))  # fmt: skip
    return found


def feature_geneval(reader: FeatureReader, prompts, seeds, feats: dict) -> dict:
    """mini-GenEval of features {(prompt, seed): (64, C)} judged on the objects read from them:
    per task (and overall) GenEval's rules and the strict judge."""
    out = {}
    for strict in (False, True):
        passed = {task: [] for task in TASKS}
        keys = [(p, s) for p in prompts for s in seeds]
        objects = reader.objects(torch.stack([feats[p.prompt, s] for p, s in keys]))
        for (p, _), found in zip(keys, objects):
            passed[p.task].append(passes(p.task, p.spec, found, strict=strict))
        scores = {t: float(np.mean(v)) for t, v in passed.items()}
        scores["overall"] = float(np.mean([scores[t] for t in TASKS]))
        out["strict" if strict else "geneval"] = scores
    return out


# ---------------------------------------------------------------- the DiT's features


@torch.no_grad()
def dit_x0_error(
    model: BLIP3o, cond: torch.Tensor, x0: torch.Tensor, sigmas: Sequence[float], seed: int = 0
) -> dict[str, float]:
    """RMS error (standardized units) of the DiT's one-step x0 = x_t - sigma v at each sigma."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    out = {}
    for s in sigmas:
        sigma = torch.full((x0.shape[0],), float(s))
        x_t = add_noise(x0, noise, sigma)
        v = model.velocity(x_t, sigma * NUM_TRAIN_TIMESTEPS, cond)
        out[f"{s:g}"] = float(((x_t - sigma.view(-1, 1, 1, 1) * v - x0) ** 2).mean().sqrt())
    return out


def feature_summary(feats: torch.Tensor) -> dict[str, float]:
    """(N, 64, C) standardized features: per-channel mean/std spread and token norms."""
    flat = feats.reshape(-1, feats.shape[-1])
    norms = feats.norm(dim=-1).flatten()
    return {
        "channel_mean_abs": float(flat.mean(0).abs().mean()),
        "channel_std_mean": float(flat.std(0).mean()),
        "token_norm_mean": float(norms.mean()),
        "token_norm_p10": float(norms.quantile(0.1)),
        "token_norm_p90": float(norms.quantile(0.9)),
    }


# ---------------------------------------------------------------- the whole diagnosis


@torch.no_grad()
def diagnose(
    pipe: ReferencePipeline,
    encoder,
    stats: dict,
    *,
    per_task: int = 12,
    seeds: Sequence[int] = (0, 1, 2, 3),
    noise_levels: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
    fragility_per_task: int = 6,
    fragility_seeds: Sequence[int] = (0, 1),
    probe_scenes: tuple[int, int] = (3000, 600),
) -> dict:
    """Taxonomy, probes, manifold and fragility of a pipeline (see the module docstring)."""
    s = pipe.config.sampler
    prompts = make_prompts(0, per_task)
    requests = [(p.prompt, seed) for p in prompts for seed in seeds]
    log.info("generating %d mini-GenEval images", len(set(requests)))
    images = batched_generate(pipe, requests)
    judged = {task: [] for task in TASKS}
    for p in prompts:
        for seed in seeds:
            judged[p.task].append((p.spec, images[p.prompt, seed]))
    report: dict = {"taxonomy": taxonomy(judged)}

    log.info("fitting probes on true target features")
    probes = probe_targets(encoder, stats, train=probe_scenes[0], test=probe_scenes[1])
    cell_probe = probes.pop("cell_probe")
    report["probes"] = probes

    # generated vs true features for the same (prompt, seed): oracle scenes satisfy the prompt
    keys = list(dict.fromkeys(requests))
    conds, gen, true = [], [], []
    for i, (prompt, seed) in enumerate(keys):
        conds.append(pipe.conditioning(prompt))
        scene = scene_for_prompt(prompt, np.random.default_rng(mix_seed(seed, i)))
        true.append(enc.normalized_features(encoder, stats, images_tensor([scene])))
    cond, true = torch.cat(conds), torch.cat(true)  # (N, 64, H), (N, 64, C)
    for start in range(0, len(keys), 64):
        chunk = keys[start : start + 64]
        noise = torch.cat([host_noise(seed, pipe._feature_shape(1))[0] for _, seed in chunk])
        gen.append(pipe.sample_tokens(cond[start : start + len(chunk)], noise, steps=s.steps,
                                      guidance=s.guidance))  # fmt: skip
    gen = torch.cat(gen)
    x0 = BLIP3o.tokens_to_features(true, pipe.config.dit.input_size)
    report["manifold"] = {
        "generated": feature_summary(gen),
        "true": feature_summary(true),
        "dit_x0_rms_error": dit_x0_error(pipe.model, cond, x0, (0.25, 0.5, 0.75, 1.0)),
    }
    # objects read from features (cell probe) vs objects in the decoded image, generated features
    by_key = {k: i for i, k in enumerate(keys)}
    feat_objects = {k: feature_objects(row) for k, row in zip(keys, _cells(cell_probe, gen))}
    true_feat_objects = [feature_objects(row) for row in _cells(cell_probe, true)]
    agree, more_in_image, more_in_features = 0, 0, 0
    for k in keys:
        n_img, n_feat = len(detect(images[k])), feat_objects[k]
        agree += n_img == n_feat
        more_in_image += n_img > n_feat
        more_in_features += n_feat > n_img
    asked = {p.prompt: (p.spec["count"] if p.task == "counting" else len(p.spec["objects"]))
             for p in prompts}  # fmt: skip
    report["feature_space"] = {
        "images": len(keys),
        "objects_asked_mean": float(np.mean([asked[p] for p, _ in keys])),
        "objects_in_generated_features_mean": float(np.mean(list(feat_objects.values()))),
        "objects_in_true_features_mean": float(np.mean(true_feat_objects)),
        "objects_in_images_mean": float(np.mean([len(detect(images[k])) for k in keys])),
        "extra_in_generated_features": float(
            np.mean([feat_objects[k] > asked[k[0]] for k in keys])
        ),
        "extra_in_true_features": float(
            np.mean([true_feat_objects[by_key[k]] > asked[k[0]] for k in keys])
        ),
        "image_equals_features": agree / len(keys),
        "image_more_than_features": more_in_image / len(keys),
        "features_more_than_image": more_in_features / len(keys),
    }

    log.info("judging objects read from features (the DiT's and the true ones)")
    reader = FeatureReader(encoder, stats, scenes=probe_scenes[0])
    report["features_judged"] = {
        "generated": feature_geneval(reader, prompts, seeds, dict(zip(keys, gen))),
        "true": feature_geneval(reader, prompts, seeds, dict(zip(keys, true))),
    }
    log.info("decoder fragility at noise levels %s", list(noise_levels))
    report["fragility"] = fragility(
        pipe, encoder, stats, noise_levels, per_task=fragility_per_task, seeds=fragility_seeds
    )
    return report


def _cells(probe, feats: torch.Tensor) -> torch.Tensor:
    n, t, d = feats.shape
    return predict(probe, feats.reshape(-1, d)).view(n, t)


@torch.no_grad()
def fragility(
    pipe: ReferencePipeline,
    encoder,
    stats: dict,
    noise_levels: Sequence[float],
    *,
    per_task: int,
    seeds: Sequence[int],
) -> dict:
    """mini-GenEval (both judges) of the decoder painting true features plus N(0, level^2)."""
    s = pipe.config.sampler
    prompts = make_prompts(0, per_task)
    keys = list(dict.fromkeys((p.prompt, seed) for p in prompts for seed in seeds))
    scenes = [scene_for_prompt(pr, np.random.default_rng(mix_seed(sd, i)))
              for i, (pr, sd) in enumerate(keys)]  # fmt: skip
    feats = enc.normalized_features(encoder, stats, images_tensor(scenes))
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(feats.shape, generator=g)
    out = {}
    for level in noise_levels:
        noisy = feats + level * noise
        painted = []
        for start in range(0, len(keys), 48):
            painted.append(enc.reconstruct(pipe.decoder, noisy[start : start + 48],
                                           steps=s.decoder_steps, seed=start,
                                           guidance=s.decoder_guidance))  # fmt: skip
        pixels = torch.cat(painted)
        pics = {k: np.asarray(to_pil(px)) for k, px in zip(keys, pixels)}
        judged = {task: [] for task in TASKS}
        for p in prompts:
            for seed in seeds:
                judged[p.task].append((p.spec, pics[p.prompt, seed]))
        table = taxonomy(judged)
        out[f"{level:g}"] = {
            "geneval": float(np.mean([table[t]["geneval"] for t in TASKS])),
            "strict": float(np.mean([table[t]["strict"] for t in TASKS])),
            "extra": float(np.mean([table[t]["extra"] for t in TASKS])),
            "smeared": float(np.mean([table[t]["smeared"] for t in TASKS])),
            "off_palette": float(np.mean([table[t]["off_palette_mean"] for t in TASKS])),
            "taxonomy": table,
        }
    return out


def to_text(report: dict) -> str:
    """The report as the model card's tables."""
    lines = ["failures of generated images (fraction of images; detector):",
             f"{'task':<14} {'geneval':>7} {'strict':>6} " + " ".join(f"{f:>10}" for f in FAILURES)
             + f" {'objects':>7} {'off-pal':>7}"]  # fmt: skip
    for task, row in report["taxonomy"].items():
        lines.append(f"{task:<14} {row['geneval']:>7.3f} {row['strict']:>6.3f} "
                     + " ".join(f"{row[f]:>10.3f}" for f in FAILURES)
                     + f" {row['objects_mean']:>7.2f} {row['off_palette_mean']:>7.3f}")  # fmt: skip
    p = report["probes"]
    lines += ["", "linear probes on true target tokens (held-out scenes):",
              f"cell color/background per token {p['cell_accuracy']:.3f} (ink cells "
              f"{p['cell_accuracy_ink']:.3f}; all-background baseline "
              f"{p['cell_majority_baseline']:.3f}); objects read from the cell map exact "
              f"{p['feature_objects_exact']:.3f}",
              f"object count from all tokens {p['count_accuracy_tokens']:.3f}, from their mean "
              f"{p['count_accuracy_pooled']:.3f}; relation from all tokens "
              f"{p['relation_accuracy_tokens']:.3f} "
              f"({p['relation_test_scenes']} scenes)"]  # fmt: skip
    fs = report["feature_space"]
    lines += ["", "objects per image: asked {:.2f}, read from generated features {:.2f}, from true "
              "features {:.2f}, in the decoded images {:.2f}".format(
                  fs["objects_asked_mean"], fs["objects_in_generated_features_mean"],
                  fs["objects_in_true_features_mean"], fs["objects_in_images_mean"]),
              "extra objects already in the generated features {:.3f} (true features {:.3f}); "
              "image = features {:.3f}, image has more {:.3f}, features have more {:.3f}".format(
                  fs["extra_in_generated_features"], fs["extra_in_true_features"],
                  fs["image_equals_features"], fs["image_more_than_features"],
                  fs["features_more_than_image"])]  # fmt: skip
    fj = report.get("features_judged")
    if fj:
        lines += [
            "",
            "mini-GenEval judged on objects read from features (no decoder; GenEval / strict):",
            f"{'features':<10} " + " ".join(f"{t:>14}" for t in (*TASKS, "overall")),
        ]
        for name in ("true", "generated"):
            lines.append(f"{name:<10} " + " ".join(
                f"{fj[name]['geneval'][t]:>6.3f}/{fj[name]['strict'][t]:<7.3f}"
                for t in (*TASKS, "overall")))  # fmt: skip
    m = report["manifold"]
    lines += ["", f"{'features':<10} " + " ".join(f"{k:>16}" for k in m["true"])]
    for name in ("true", "generated"):
        lines.append(f"{name:<10} " + " ".join(f"{v:>16.3f}" for v in m[name].values()))
    lines.append("DiT one-step x0 RMS error at sigma " + ", ".join(
        f"{k}: {v:.3f}" for k, v in m["dit_x0_rms_error"].items()))  # fmt: skip
    lines += [
        "",
        "decoder from true features + noise (std, standardized units):",
        f"{'noise':>6} {'geneval':>8} {'strict':>7} {'extra':>6} {'smeared':>8} {'off-pal':>8}",
    ]
    for level, row in report["fragility"].items():
        lines.append(f"{level:>6} {row['geneval']:>8.3f} {row['strict']:>7.3f} "
                     f"{row['extra']:>6.3f} {row['smeared']:>8.3f} "
                     f"{row['off_palette']:>8.3f}")  # fmt: skip
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".txt").write_text(to_text(report) + "\n")
