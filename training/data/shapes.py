"""The procedural shapes world (docs/shapes-world.md): 64x64 images of flat colored shapes, each
drawn together with one canonical caption of a four-form grammar, plus the understanding Q&A.

BLIP3-o's real weights cannot be downloaded here, so the two-stage recipe is proven on this world:
small enough for a 2-core CPU to learn, yet every caption can be checked from pixels
(training/eval/detect.py), so generation is scored without a learned judge.

Geometry is defined once, as per-size boolean masks (`shape_mask`) used by the renderer and by
`ShapeObject.centroid`, so the centroid a relation is decided on is exactly the pixel centroid the
detector measures. With side s and pixel (col, row) taken at its center (x, y) = (col + 0.5,
row + 0.5) in box coordinates, a pixel is covered when:
- square: always;
- circle: (x - s/2)^2 + (y - s/2)^2 <= (s/2)^2, the disc inscribed in the box;
- triangle: |x - s/2| <= (row + 1) / 2, so the apex row holds 1-2 px at the top of the box and the
  bottom row spans the whole base.
All three touch the four sides of their box, so a detected bbox equals the object's box. Fill
ratios for s in [12, 20]: square 1.0, circle 0.78-0.81, triangle 0.55-0.58, clear of the
detector's 0.62 and 0.88 thresholds. Centroids are (x, y) in pixel-index coordinates (x = column,
y = row, growing downward): the mean index of the covered pixels, which for the triangle sits near
its geometric centroid, about 2/3 of the height below the apex.

Seed namespaces: training streams take seeds in [0, 10**6); held-out evaluation draws from
EVAL_SEED_OFFSET + seed (10**9 + seed), so the two never share a generator seed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("to the left of", "to the right of", "above", "below")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
FORMS = ("single", "pair", "count", "relation")
IMAGE_SIZE = 64
BACKGROUND = (255, 255, 255)
MIN_SIZE, MAX_SIZE = 12, 20
MIN_GAP = 2  # empty pixels between two boxes
BORDER = 1  # empty pixels between a box and the image edge
COLOR_DROP_PROB = 0.15
MIN_RELATION_OFFSET = 8
MAX_LAYOUT_TRIES = 2000
TRAIN_SEED_LIMIT = 10**6
EVAL_SEED_OFFSET = 10**9

DESCRIBE_QUESTION = "Describe the image."
COUNT_QUESTION = "How many {shape}s are there?"
COLOR_QUESTION = "What color is the {shape}?"


def vocabulary() -> list[str]:
    """Every word the caption grammar uses (the tiny model knows no other), sorted: colors,
    shapes and their plurals, relation and count words, `a` and `and`."""
    words = {"a", "and", *COLORS, *SHAPES, *(f"{s}s" for s in SHAPES), *COUNT_WORDS}
    words |= {w for relation in RELATIONS for w in relation.split()}
    return sorted(words)


def _check_name(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {list(allowed)}")
    return value


@functools.cache
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Read-only (size, size) bool mask of `shape` in its box (see the module docstring)."""
    _check_name(shape, SHAPES, "shape")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"shape size {size} out of range [{MIN_SIZE}, {MAX_SIZE}]")
    offset = np.arange(size) + 0.5 - size / 2  # (s,) pixel-center offsets from the box center
    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        mask = offset[None, :] ** 2 + offset[:, None] ** 2 <= (size / 2) ** 2
    else:
        mask = np.abs(offset)[None, :] <= (np.arange(size)[:, None] + 1) / 2
    mask.flags.writeable = False
    return mask


@functools.cache
def _mask_centroid(shape: str, size: int) -> tuple[float, float]:
    rows, cols = np.nonzero(shape_mask(shape, size))
    return float(cols.mean()), float(rows.mean())


@dataclass(frozen=True)
class ShapeObject:
    """One shape: its color, kind and axis-aligned box (top-left x0, y0 and side `size`)."""

    color: str
    shape: str
    x0: int
    y0: int
    size: int

    def __post_init__(self) -> None:
        _check_name(self.color, COLORS, "color")
        shape_mask(self.shape, self.size)  # validates shape and size

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) with x1, y1 exclusive."""
        return self.x0, self.y0, self.x0 + self.size, self.y0 + self.size

    @property
    def centroid(self) -> tuple[float, float]:
        """(x, y) mean pixel index of the rendered shape: what the detector measures."""
        cx, cy = _mask_centroid(self.shape, self.size)
        return self.x0 + cx, self.y0 + cy


@dataclass(frozen=True)
class Scene:
    """The objects of one image and its canonical caption of grammar form `form`."""

    objects: tuple[ShapeObject, ...]
    caption: str
    form: str

    def render(self) -> np.ndarray:
        return render(self.objects)


def render(objects: Sequence[ShapeObject]) -> np.ndarray:
    """Draw objects on white: (64, 64, 3) uint8, flat palette fills, no anti-aliasing."""
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, dtype=np.uint8)  # (64, 64, 3)
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        if x0 < 0 or y0 < 0 or x1 > IMAGE_SIZE or y1 > IMAGE_SIZE:
            raise ValueError(f"object box {obj.box} does not fit a {IMAGE_SIZE}x{IMAGE_SIZE} image")
        image[y0:y1, x0:x1][shape_mask(obj.shape, obj.size)] = PALETTE[obj.color]
    return image


def box_gap(a: ShapeObject, b: ShapeObject) -> int:
    """Empty pixels separating two boxes along the axis where they are apart (<= 0: they touch)."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


def relation_of(a: ShapeObject, b: ShapeObject) -> str | None:
    """The relation `a {rel} b` the grammar names, or None when no relation caption is allowed.

    The named axis is the one with the strictly larger centroid offset (ties name nothing), and that
    offset must be at least MIN_RELATION_OFFSET px. Image y grows downward: `above` is smaller y.
    """
    (ax, ay), (bx, by) = a.centroid, b.centroid
    dx, dy = ax - bx, ay - by
    if abs(dx) == abs(dy) or max(abs(dx), abs(dy)) < MIN_RELATION_OFFSET:
        return None
    if abs(dx) > abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


_C, _S, _R = "|".join(COLORS), "|".join(SHAPES), "|".join(RELATIONS)
_PATTERNS = {
    "single": re.compile(rf"a (?:({_C}) )?({_S})"),
    "pair": re.compile(rf"a ({_C}) ({_S}) and a ({_C}) ({_S})"),
    "count": re.compile(rf"(two|three|four) ({_C}) ({_S})s"),
    "relation": re.compile(rf"a ({_C}) ({_S}) ({_R}) a ({_C}) ({_S})"),
}


def parse_caption(caption: str) -> dict:
    """Parse a caption of the grammar into its structured form.

    Returns {"form": str, "objects": ((color | None, shape), ...) as named in the caption (count:
    one entry), "count": number of objects in the image, "relation": str | None}. Raises ValueError
    naming the caption when it is not in the grammar (including a pair or relation that names the
    same object twice).
    """
    for form, pattern in _PATTERNS.items():
        match = pattern.fullmatch(caption)
        if match is None:
            continue
        g = match.groups()
        relation = None
        if form == "single":
            objects, count = ((g[0], g[1]),), 1
        elif form == "pair":
            objects, count = ((g[0], g[1]), (g[2], g[3])), 2
        elif form == "count":
            objects, count = ((g[1], g[2]),), COUNT_WORDS.index(g[0])
        else:
            objects, count, relation = ((g[0], g[1]), (g[3], g[4])), 2, g[2]
        if count == 2 and form != "count" and objects[0] == objects[1]:
            raise ValueError(
                f"caption {caption!r} names the same object twice; {form} objects must differ "
                "in color or shape"
            )
        return {"form": form, "objects": objects, "count": count, "relation": relation}
    raise ValueError(f"caption {caption!r} is not in the shapes-world grammar (forms {FORMS})")


def format_caption(spec: dict) -> str:
    """The caption of a structured spec (the inverse of `parse_caption`, which validates it)."""
    form, objects = _check_name(spec["form"], FORMS, "caption form"), spec["objects"]
    words = [f"{color} {shape}" if color is not None else shape for color, shape in objects]
    if form == "single":
        caption = f"a {words[0]}"
    elif form == "pair":
        caption = f"a {words[0]} and a {words[1]}"
    elif form == "count":
        if not 2 <= spec["count"] <= 4:
            raise ValueError(f"count caption needs a count in [2, 4], got {spec['count']}")
        caption = f"{COUNT_WORDS[spec['count']]} {words[0]}s"
    else:
        caption = f"a {words[0]} {spec['relation']} a {words[1]}"
    parse_caption(caption)
    return caption


def caption_describes(caption: str, objects: Sequence) -> bool:
    """Whether `caption` is a canonical caption, colors included, of a scene with `objects`.

    `objects` are ShapeObjects or detections (anything with `color`, `shape` and `centroid`). A
    two-object scene has several such captions (a pair in either order, a relation in either
    direction): each is true of the image. The caption must name exactly the scene's objects, with
    colors; a relation must be the one the grammar names for that pair (`relation_of`).
    """
    try:
        spec = parse_caption(caption)
    except ValueError:
        return False
    named = spec["objects"]
    if any(color is None for color, _ in named) or spec["count"] != len(objects):
        return False
    present = sorted((o.color, o.shape) for o in objects)
    if spec["form"] == "count":
        return present == [tuple(named[0])] * spec["count"]
    if present != sorted(tuple(n) for n in named):
        return False
    if spec["form"] != "relation":
        return True
    first = next(o for o in objects if (o.color, o.shape) == tuple(named[0]))
    second = next(o for o in objects if (o.color, o.shape) == tuple(named[1]))
    return relation_of(first, second) == spec["relation"]


def _pick(rng: np.random.Generator, names: Sequence[str]) -> str:
    return names[int(rng.integers(len(names)))]


def _layout(
    items: Sequence[tuple[str, str]],
    rng: np.random.Generator,
    accept: Callable[[tuple[ShapeObject, ...]], bool] | None,
    what: str,
) -> tuple[ShapeObject, ...]:
    """Rejection-sample boxes (random sizes) for (color, shape) items under the layout rules."""
    for _ in range(MAX_LAYOUT_TRIES):
        placed: list[ShapeObject] = []
        for color, shape in items:
            size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
            x0, y0 = (int(v) for v in rng.integers(BORDER, IMAGE_SIZE - BORDER - size + 1, size=2))
            obj = ShapeObject(color, shape, x0, y0, size)
            if any(box_gap(obj, other) < MIN_GAP for other in placed):
                break
            placed.append(obj)
        else:
            if accept is None or accept(tuple(placed)):
                return tuple(placed)
    raise RuntimeError(f"no layout for {what!r} met the layout rules in {MAX_LAYOUT_TRIES} tries")


def scene_from_spec(spec: dict, rng: np.random.Generator) -> Scene:
    """A random scene whose canonical caption is `spec`'s (a dropped single color is drawn)."""
    caption = format_caption(spec)
    form, objects = spec["form"], spec["objects"]
    if form == "single":
        color, shape = objects[0]
        items = [(color if color is not None else _pick(rng, COLORS), shape)]
    elif form == "count":
        items = [tuple(objects[0])] * spec["count"]
    else:
        items = [tuple(obj) for obj in objects]

    def named_relation_holds(objs: tuple[ShapeObject, ...]) -> bool:
        return relation_of(objs[0], objs[1]) == spec["relation"]

    accept = named_relation_holds if form == "relation" else None
    return Scene(_layout(items, rng, accept, caption), caption, form)


def sample_spec(rng: np.random.Generator, form: str | None = None) -> dict:
    """Draw a caption spec: form uniform over FORMS unless given, names uniform."""
    form = _pick(rng, FORMS) if form is None else _check_name(form, FORMS, "caption form")
    first = (_pick(rng, COLORS), _pick(rng, SHAPES))
    spec = {"form": form, "objects": (first,), "count": 1, "relation": None}
    if form == "single" and rng.random() < COLOR_DROP_PROB:
        spec["objects"] = ((None, first[1]),)
    elif form == "count":
        spec["count"] = int(rng.integers(2, 5))
    elif form in ("pair", "relation"):
        second = first
        while second == first:
            second = (_pick(rng, COLORS), _pick(rng, SHAPES))
        spec["objects"], spec["count"] = (first, second), 2
        if form == "relation":
            spec["relation"] = _pick(rng, RELATIONS)
    return spec


def sample_scene(rng: np.random.Generator, form: str | None = None) -> Scene:
    """Draw one scene with its canonical caption; `form` is one of FORMS or None (uniform)."""
    return scene_from_spec(sample_spec(rng, form), rng)


def stream(seed: int, forms: Sequence[str] | None = None) -> Iterator[Scene]:
    """Infinite deterministic scene stream for training; seed in [0, TRAIN_SEED_LIMIT)."""
    if not 0 <= seed < TRAIN_SEED_LIMIT:
        raise ValueError(f"training stream seed {seed} out of range [0, {TRAIN_SEED_LIMIT})")
    forms = FORMS if forms is None else tuple(forms)
    if not forms:
        raise ValueError(f"forms must name at least one of {FORMS}")
    for form in forms:
        _check_name(form, FORMS, "caption form")
    rng = np.random.default_rng(seed)
    while True:
        yield sample_scene(rng, _pick(rng, forms))


def full_caption(scene: Scene) -> str:
    """The canonical caption with the color always included (the `Describe the image.` answer)."""
    if scene.form == "single":
        obj = scene.objects[0]
        return f"a {obj.color} {obj.shape}"
    return scene.caption


def questions(scene: Scene) -> list[tuple[str, str]]:
    """Every understanding question the scene supports, with its answer."""
    counts = {shape: sum(obj.shape == shape for obj in scene.objects) for shape in SHAPES}
    qa = [(DESCRIBE_QUESTION, full_caption(scene))]
    qa += [(COUNT_QUESTION.format(shape=s), COUNT_WORDS[counts[s]]) for s in SHAPES]
    for shape in SHAPES:
        if counts[shape] == 1:
            color = next(obj.color for obj in scene.objects if obj.shape == shape)
            qa.append((COLOR_QUESTION.format(shape=shape), color))
    return qa


def sample_qa(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """One question: its type uniform over the types the scene supports, then its shape uniform
    (a count may ask about an absent shape; a color question only about a shape present once)."""
    kinds = ["describe", "count"]
    unique = [s for s in SHAPES if sum(obj.shape == s for obj in scene.objects) == 1]
    if unique:
        kinds.append("color")
    kind = _pick(rng, kinds)
    if kind == "describe":
        return DESCRIBE_QUESTION, full_caption(scene)
    by_question = dict(questions(scene))
    shape = _pick(rng, SHAPES if kind == "count" else unique)
    question = (COUNT_QUESTION if kind == "count" else COLOR_QUESTION).format(shape=shape)
    return question, by_question[question]
