"""mini-GenEval: GenEval's six generation tasks on the shapes world (docs/shapes-world.md).

Prompts are captions of the shapes grammar, drawn with a fixed seed; every prompt is generated
with seeds 0-3 and each image passes or fails its task's rule as judged by the rule-based palette
detector (training/eval/detect.py). A task's score is the fraction of its images that pass;
`overall` is the mean of the six task scores (GenEval's convention). `evaluate` takes any
`generate_fn(prompt, seed)`, so the PyTorch pipeline and the exported runtime are scored alike.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.data.shapes import (
    COLORS,
    RELATIONS,
    SHAPES,
    Scene,
    format_caption,
    parse_caption,
    scene_from_spec,
)
from training.eval.detect import Detection, detect

logger = logging.getLogger(__name__)

TASKS = ("single_object", "colors", "two_object", "color_attr", "counting", "position")
EVAL_SEEDS = (0, 1, 2, 3)
MIN_PROMPTS_PER_TASK = 25
MIN_POSITION_OFFSET = 3
_TASK_FORM = {
    "single_object": "single",
    "colors": "single",
    "two_object": "pair",
    "color_attr": "pair",
    "counting": "count",
    "position": "relation",
}


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: its task, caption text and parsed caption (`parse_caption`)."""

    task: str
    prompt: str
    spec: dict


@dataclass(frozen=True)
class Record:
    """One judged image."""

    task: str
    prompt: str
    seed: int
    passed: bool
    image: np.ndarray = field(compare=False, repr=False)


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown mini-GenEval task {task!r}; expected one of {list(TASKS)}")
    return task


def _valid_for_task(task: str, spec: dict) -> bool:
    objects = spec["objects"]
    if spec["form"] != _TASK_FORM[task]:
        return False
    if task == "single_object":
        return objects[0][0] is None
    if task == "colors":
        return objects[0][0] is not None
    if task == "two_object":
        return objects[0][1] != objects[1][1]
    if task == "color_attr":
        return objects[0][0] != objects[1][0] and objects[0][1] != objects[1][1]
    return True


def task_prompts(task: str) -> list[str]:
    """Every distinct prompt of a task, in a fixed order."""
    _check_task(task)
    names = [(None, s) for s in SHAPES] + [(c, s) for c in COLORS for s in SHAPES]
    colored = names[len(SHAPES) :]
    specs = [{"form": "single", "objects": (o,), "count": 1, "relation": None} for o in names]
    specs += [{"form": "count", "objects": (o,), "count": n, "relation": None}
              for n in (2, 3, 4) for o in colored]  # fmt: skip
    specs += [{"form": "pair", "objects": (a, b), "count": 2, "relation": None}
              for a in colored for b in colored if a != b]  # fmt: skip
    specs += [{"form": "relation", "objects": (a, b), "count": 2, "relation": r}
              for r in RELATIONS for a in colored for b in colored if a != b]  # fmt: skip
    return [format_caption(s) for s in specs if _valid_for_task(task, s)]


def make_prompts(seed: int = 0, per_task: int = MIN_PROMPTS_PER_TASK) -> list[Prompt]:
    """Evaluation prompts, deterministic in `seed`, grouped by task in TASKS order.

    A task with at least `per_task` distinct prompts gets `per_task` of them, drawn without
    replacement. A task with fewer (single_object has 3, colors 18) gets its whole set, shuffled and
    repeated until it holds at least `per_task`, so every prompt of it weighs the same.
    """
    if per_task < 1:
        raise ValueError(f"per_task must be >= 1, got {per_task}")
    rng = np.random.default_rng(seed)
    prompts = []
    for task in TASKS:
        pool = task_prompts(task)
        order = [pool[i] for i in rng.permutation(len(pool))]
        chosen = order[:per_task] if len(pool) >= per_task else order * -(-per_task // len(pool))
        prompts += [Prompt(task, text, parse_caption(text)) for text in chosen]
    return prompts


def scene_for_prompt(prompt: str, rng: np.random.Generator) -> Scene:
    """A ground-truth scene that satisfies `prompt` (an oracle for tests and sanity checks)."""
    return scene_from_spec(parse_caption(prompt), rng)


def _as_image(image) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL.Image.Image
        return np.asarray(image.convert("RGB"))
    return np.asarray(image)


def _offset_holds(relation: str, a: Detection, b: Detection) -> bool:
    (ax, ay), (bx, by) = a.centroid, b.centroid
    offset = {
        "to the left of": bx - ax,
        "to the right of": ax - bx,
        "above": by - ay,
        "below": ay - by,
    }
    return offset[relation] >= MIN_POSITION_OFFSET


def check(task: str, spec: dict, image) -> bool:
    """Whether one generated image (array or PIL image) passes `task` for the parsed prompt `spec`.

    single_object: exactly one object, of the shape. colors: exactly one object, of the shape and
    color. two_object: an object of each shape. color_attr: an s1 colored c1 and an s2 colored c2.
    counting: exactly N objects of the shape (color not judged, as the spec's rule says). position:
    some (c1, s1) and a different (c2, s2) object whose centroids are >= 3 px apart in the named
    direction (y grows downward, `above` is smaller y).
    """
    return passes(task, spec, detect(_as_image(image)))


def passes(task: str, spec: dict, found: Sequence[Detection], *, strict: bool = False) -> bool:
    """`check` (or with `strict`, `check_strict`) of an image's detections: the judges' rules on
    any list of detected objects (the image detector's, or objects read from features)."""
    if not _valid_for_task(_check_task(task), spec):
        raise ValueError(f"spec {spec} is not a {task} prompt")
    if strict:
        return _strict(task, spec, found)
    objects = spec["objects"]

    def matching(color: str | None, shape: str) -> list[Detection]:
        return [d for d in found if d.shape == shape and (color is None or d.color == color)]

    if task in ("single_object", "colors"):
        return len(found) == 1 and len(matching(*objects[0])) == 1
    if task == "two_object":
        return all(matching(None, shape) for _, shape in objects)
    if task == "color_attr":
        return all(matching(color, shape) for color, shape in objects)
    if task == "counting":
        return len(matching(None, objects[0][1])) == spec["count"]
    return any(
        a is not b and _offset_holds(spec["relation"], a, b)
        for a in matching(*objects[0])
        for b in matching(*objects[1])
    )


def check_strict(task: str, spec: dict, image) -> bool:
    """Judged as a person would: `check`, and the image holds exactly the asked objects and
    nothing else (an extra object, or one of the wrong color where the prompt names one, fails).

    single_object / colors: as `check` (already exactly one object). two_object: exactly two
    objects, the two asked shapes. color_attr and position: exactly two objects, (c1, s1) and
    (c2, s2) (position: in the named relation). counting: exactly N objects, all of the shape
    and of the color when the prompt names one."""
    return passes(task, spec, detect(_as_image(image)), strict=True)


def _strict(task: str, spec: dict, found: Sequence[Detection]) -> bool:
    if not passes(task, spec, found):
        return False
    objects = spec["objects"]
    if task in ("single_object", "colors"):
        return True
    if task == "counting":
        (color, shape), n = objects[0], spec["count"]
        return len(found) == n and all(
            d.shape == shape and (color is None or d.color == color) for d in found
        )
    if len(found) != 2:
        return False
    if task == "two_object":
        return sorted(d.shape for d in found) == sorted(s for _, s in objects)
    wanted = sorted((c, s) for c, s in objects)
    return sorted((d.color, d.shape) for d in found) == wanted


JUDGES = {"geneval": check, "strict": check_strict}


def score(records: Iterable[Record]) -> dict[str, float]:
    """Per-task pass fraction and `overall`, the mean of the six task scores."""
    passed: dict[str, list[bool]] = {task: [] for task in TASKS}
    for record in records:
        passed[_check_task(record.task)].append(bool(record.passed))
    missing = [task for task in TASKS if not passed[task]]
    if missing:
        raise ValueError(f"no records for tasks {missing}; overall needs all of {list(TASKS)}")
    scores = {task: float(np.mean(passed[task])) for task in TASKS}
    scores["overall"] = float(np.mean([scores[task] for task in TASKS]))
    return scores


def evaluate(
    generate_fn: Callable[[str, int], object],
    prompts: Sequence[Prompt],
    seeds: Sequence[int] = EVAL_SEEDS,
    *,
    judge: str = "geneval",
) -> dict:
    """Generate and judge every (prompt, seed); returns `score`'s dict plus "records".
    `judge`: "geneval" (GenEval's rules: extra objects pass) or "strict" (`check_strict`).

    `generate_fn(prompt, seed)` returns an (H, W, 3) uint8 array or a PIL image and must be
    deterministic in (prompt, seed): a prompt repeated (within or across tasks) reuses its first
    image for that seed.
    """
    if judge not in JUDGES:
        raise ValueError(f"judge must be one of {', '.join(JUDGES)}, got {judge!r}")
    images: dict[tuple[str, int], np.ndarray] = {}
    judged: dict[tuple[str, str, int], Record] = {}
    records = []
    for prompt in prompts:
        for seed in seeds:
            if (prompt.prompt, seed) not in images:
                images[prompt.prompt, seed] = _as_image(generate_fn(prompt.prompt, seed))
            key = (prompt.task, prompt.prompt, seed)
            if key not in judged:
                image = images[prompt.prompt, seed]
                passed = JUDGES[judge](prompt.task, prompt.spec, image)
                judged[key] = Record(prompt.task, prompt.prompt, seed, passed, image)
            records.append(judged[key])
    result: dict = score(records)
    logger.info("mini-GenEval overall %.3f over %d images", result["overall"], len(records))
    result["records"] = records
    return result


def to_table(result: dict) -> str:
    """A text table of task scores (with passed/total counts when `result` holds records)."""
    counts = {task: [0, 0] for task in TASKS}
    for record in result.get("records", ()):
        counts[record.task][0] += int(record.passed)
        counts[record.task][1] += 1
    lines = [f"{'task':<14} {'score':>6}  passed"]
    for task in TASKS:
        ok, total = counts[task]
        lines.append(f"{task:<14} {result[task]:>6.3f}  {f'{ok}/{total}' if total else ''}")
    lines.append(f"{'overall':<14} {result['overall']:>6.3f}")
    return "\n".join(lines)


def save_grid(records: Sequence[Record], path: str | Path, cols: int = 8) -> Path:
    """Write a PNG grid: images at 2x, framed green (pass) or red (fail), prompt and seed below."""
    from PIL import Image, ImageDraw

    if not records or cols < 1:
        raise ValueError(f"need at least one record and cols >= 1, got {len(records)}, {cols}")
    scale, pad, text_h, wrap = 2, 4, 40, 30
    side = records[0].image.shape[0] * scale
    cell_w, cell_h = side + 2 * pad, side + 2 * pad + text_h
    rows = -(-len(records) // cols)
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, record in enumerate(records):
        x, y = (k % cols) * cell_w + pad, (k // cols) * cell_h + pad
        tile = Image.fromarray(record.image).resize((side, side), Image.Resampling.NEAREST)
        canvas.paste(tile, (x, y))
        frame = (40, 160, 60) if record.passed else (220, 40, 40)
        draw.rectangle((x - 2, y - 2, x + side + 1, y + side + 1), outline=frame, width=2)
        text = textwrap.fill(f"{record.prompt} [seed {record.seed}]", width=wrap)
        draw.multiline_text((x, y + side + 3), text, fill=(0, 0, 0), spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
