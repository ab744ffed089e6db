"""Shapes world: grammar, palette, geometry and layout rules, relations, determinism, detector."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from training.data import shapes
from training.data.shapes import (
    COLORS,
    COUNT_WORDS,
    FORMS,
    PALETTE,
    RELATIONS,
    SHAPES,
    ShapeObject,
    box_gap,
    caption_describes,
    format_caption,
    full_caption,
    parse_caption,
    questions,
    relation_of,
    render,
    sample_qa,
    sample_scene,
    shape_mask,
    stream,
)
from training.eval.detect import MIN_AREA, detect, shape_from_fill


@pytest.fixture(scope="module")
def scenes() -> list[shapes.Scene]:
    rng = np.random.default_rng(1234)
    return [sample_scene(rng) for _ in range(1500)]


def test_constants_match_spec():
    assert PALETTE == {
        "red": (220, 40, 40),
        "green": (40, 160, 60),
        "blue": (40, 80, 220),
        "yellow": (230, 200, 40),
        "purple": (140, 60, 180),
        "orange": (240, 140, 30),
    }
    assert SHAPES == ("circle", "square", "triangle")
    assert shapes.IMAGE_SIZE == 64
    assert set(RELATIONS) == {"to the left of", "to the right of", "above", "below"}
    assert COUNT_WORDS == ("zero", "one", "two", "three", "four")


def test_every_caption_parses_and_round_trips(scenes):
    for scene in scenes:
        spec = parse_caption(scene.caption)
        assert spec["form"] == scene.form
        assert format_caption(spec) == scene.caption
        assert spec["count"] == len(scene.objects)
        named = [(o.color, o.shape) for o in scene.objects]
        if scene.form == "single":
            color, shape = spec["objects"][0]
            assert shape == scene.objects[0].shape and color in (None, scene.objects[0].color)
        elif scene.form == "count":
            assert 2 <= spec["count"] <= 4 and set(named) == {spec["objects"][0]}
        else:
            assert list(spec["objects"]) == named and named[0] != named[1]
        assert (spec["relation"] is not None) == (scene.form == "relation")


def test_all_forms_and_color_drop_rate(scenes):
    assert {scene.form for scene in scenes} == set(FORMS)
    rng = np.random.default_rng(5)
    singles = [sample_scene(rng, "single") for _ in range(3000)]
    dropped = np.mean([parse_caption(s.caption)["objects"][0][0] is None for s in singles])
    assert 0.12 < dropped < 0.18
    assert {s.objects[0].color for s in singles} == set(COLORS)


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a pink circle",
        "A red circle",
        "a red circle ",
        "a red circles",
        "one red circle",
        "five red circles",
        "two circles",
        "a red circle and a red circle",
        "a red circle above a red circle",
        "a red circle next to a blue square",
        "a red circle and blue square",
    ],
)
def test_parse_rejects_captions_outside_the_grammar(caption):
    with pytest.raises(ValueError, match="caption"):
        parse_caption(caption)


def test_parse_examples():
    assert parse_caption("a square") == {
        "form": "single",
        "objects": ((None, "square"),),
        "count": 1,
        "relation": None,
    }
    spec = parse_caption("three blue triangles")
    assert (
        spec["form"] == "count"
        and spec["count"] == 3
        and spec["objects"] == (("blue", "triangle"),)
    )
    spec = parse_caption("a red circle to the right of a red square")
    assert spec["relation"] == "to the right of"
    assert spec["objects"] == (("red", "circle"), ("red", "square"))


def test_render_uses_exact_palette_colors(scenes):
    allowed = set(PALETTE.values()) | {(255, 255, 255)}
    for scene in scenes[:300]:
        image = render(scene.objects)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        colors = {tuple(int(v) for v in px) for px in np.unique(image.reshape(-1, 3), axis=0)}
        assert colors <= allowed
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            patch = image[y0:y1, x0:x1]
            mask = shape_mask(obj.shape, obj.size)
            assert (patch[mask] == PALETTE[obj.color]).all()
            assert (patch[~mask] == 255).all()
        colored = (image != 255).any(axis=-1).sum()
        assert colored == sum(shape_mask(o.shape, o.size).sum() for o in scene.objects)


def test_layout_rules(scenes):
    for scene in scenes:
        assert 1 <= len(scene.objects) <= 4
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert 12 <= obj.size <= 20
            assert x0 >= 1 and y0 >= 1 and x1 <= 63 and y1 <= 63
        for a, b in itertools.combinations(scene.objects, 2):
            assert box_gap(a, b) >= 2, (a, b)
        expected = {"single": {1}, "pair": {2}, "relation": {2}, "count": {2, 3, 4}}
        assert len(scene.objects) in expected[scene.form]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", range(12, 21))
def test_shape_masks_fill_their_box(shape, size):
    mask = shape_mask(shape, size)
    assert mask.shape == (size, size)
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
    assert (mask == mask[:, ::-1]).all()  # left-right symmetric
    assert shape_from_fill(mask.mean()) == shape
    if shape == "triangle":
        assert mask[-1].all() and mask[0].sum() <= 2  # base at the bottom, apex up
        widths = mask.sum(axis=1)
        assert (np.diff(widths) >= 0).all()


def test_relation_rule_holds_on_measured_centroids(scenes):
    relation_scenes = [s for s in scenes if s.form == "relation"]
    assert {parse_caption(s.caption)["relation"] for s in relation_scenes} == set(RELATIONS)
    for scene in relation_scenes:
        relation = parse_caption(scene.caption)["relation"]
        first, second = scene.objects
        found = {(d.color, d.shape): d.centroid for d in detect(scene.render())}
        (ax, ay), (bx, by) = found[(first.color, first.shape)], found[(second.color, second.shape)]
        assert (ax, ay) == pytest.approx(first.centroid)
        dx, dy = ax - bx, ay - by
        horizontal = relation in ("to the left of", "to the right of")
        major, minor = (dx, dy) if horizontal else (dy, dx)
        assert abs(major) > abs(minor) and abs(major) >= 8
        assert (major < 0) == (relation in ("to the left of", "above"))


def test_relation_of_examples():
    a = ShapeObject("red", "square", 5, 5, 12)
    assert relation_of(a, ShapeObject("blue", "square", 30, 8, 12)) == "to the left of"
    assert relation_of(a, ShapeObject("blue", "square", 8, 30, 12)) == "above"
    assert relation_of(ShapeObject("blue", "square", 8, 30, 12), a) == "below"
    assert relation_of(a, ShapeObject("blue", "square", 12, 45, 12)) == "above"
    assert relation_of(a, ShapeObject("blue", "square", 12, 10, 12)) is None  # offset 7: too small
    assert relation_of(a, ShapeObject("blue", "square", 25, 25, 12)) is None  # tie


def test_stream_is_deterministic_and_endless():
    first = list(itertools.islice(stream(7), 60))
    assert first == list(itertools.islice(stream(7), 60))
    assert first != list(itertools.islice(stream(8), 60))
    only_counts = list(itertools.islice(stream(3, forms=["count"]), 20))
    assert {s.form for s in only_counts} == {"count"}
    with pytest.raises(ValueError, match="seed"):
        next(stream(10**9))
    with pytest.raises(ValueError, match="form"):
        next(stream(0, forms=["story"]))


def test_layout_exhaustion_raises(monkeypatch):
    monkeypatch.setattr(shapes, "MAX_LAYOUT_TRIES", 0)
    with pytest.raises(RuntimeError, match="layout"):
        sample_scene(np.random.default_rng(0))


def test_object_validation():
    with pytest.raises(ValueError, match="pink"):
        ShapeObject("pink", "circle", 1, 1, 12)
    with pytest.raises(ValueError, match="size 21"):
        ShapeObject("red", "circle", 1, 1, 21)
    with pytest.raises(ValueError, match="fit"):
        render([ShapeObject("red", "circle", 50, 1, 20)])


def test_questions_answers(scenes):
    for scene in scenes[:400]:
        qa = dict(questions(scene))
        described = qa["Describe the image."]
        assert described == full_caption(scene)
        assert all(color is not None for color, _ in parse_caption(described)["objects"])
        for shape in SHAPES:
            n = sum(o.shape == shape for o in scene.objects)
            assert qa[f"How many {shape}s are there?"] == COUNT_WORDS[n]
            color_q = f"What color is the {shape}?"
            assert (color_q in qa) == (n == 1)
            if n == 1:
                assert qa[color_q] == next(o.color for o in scene.objects if o.shape == shape)
    rng = np.random.default_rng(0)
    asked = [sample_qa(scene, rng) for scene in scenes[:400]]
    assert all(a in questions(s) for a, s in zip(asked, scenes[:400], strict=True))
    assert ("zero" in {a for _, a in asked}) and any(q.startswith("What color") for q, _ in asked)


def test_detector_recovers_every_object(scenes):
    for scene in scenes[:400]:
        found = sorted(
            (d.color, d.shape, d.bbox, d.area, d.centroid) for d in detect(scene.render())
        )
        expected = sorted(
            (o.color, o.shape, o.box, int(shape_mask(o.shape, o.size).sum()), o.centroid)
            for o in scene.objects
        )
        assert [f[:4] for f in found] == [e[:4] for e in expected]
        for f, e in zip(found, expected, strict=True):
            assert f[4] == pytest.approx(e[4])


def test_detector_color_tolerance_and_min_area():
    image = np.full((64, 64, 3), 255, dtype=np.uint8)
    image[5:25, 5:25] = (220 + 30, 40 + 30, 40 + 30)  # distance 52 from red: still red
    image[30:50, 30:50] = (220 - 40, 40 + 40, 40 + 40)  # distance 69: background
    image[2:6, 40:45] = PALETTE["blue"]  # 20 px: kept
    image[40:44, 5:9] = PALETTE["green"]  # 16 px: dropped
    found = {(d.color, d.shape, d.area) for d in detect(image)}
    assert found == {("red", "square", 400), ("blue", "square", MIN_AREA)}
    with pytest.raises(ValueError, match="uint8"):
        detect(image.astype(np.float32))


OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}  # fmt: skip


def test_caption_describes_accepts_every_true_caption_and_nothing_else(scenes):
    checked = {"pair": 0, "relation": 0}
    for scene in scenes[:600]:
        found = detect(scene.render())
        truth = full_caption(scene)
        assert caption_describes(truth, scene.objects) and caption_describes(truth, found)
        if scene.form == "single" and scene.caption != truth:  # color dropped: not a description
            assert not caption_describes(scene.caption, scene.objects)
        if len(scene.objects) != 2 or scene.form == "count":
            continue
        (c1, s1), (c2, s2) = ((o.color, o.shape) for o in scene.objects)
        swapped = f"a {c2} {s2} and a {c1} {s1}"
        assert caption_describes(swapped, found) and caption_describes(
            f"a {c1} {s1} and a {c2} {s2}", found
        )
        other = next(c for c in COLORS if c not in (c1, c2))
        assert not caption_describes(f"a {other} {s1} and a {c2} {s2}", found)
        assert not caption_describes(f"a {c1} {s1}", found)  # names one of two objects
        rel = relation_of(scene.objects[0], scene.objects[1])
        if rel is not None:
            assert caption_describes(f"a {c2} {s2} {OPPOSITE[rel]} a {c1} {s1}", found)
            assert not caption_describes(f"a {c1} {s1} {OPPOSITE[rel]} a {c2} {s2}", found)
            checked["relation"] += 1
        checked["pair"] += 1
    assert min(checked.values()) > 20
    assert not caption_describes("a red blob", scenes[0].objects)
    assert not caption_describes("", scenes[0].objects)


def test_caption_describes_counts_exactly():
    objs = [ShapeObject("red", "circle", 2 + 20 * i, 2, 12) for i in range(3)]
    assert caption_describes("three red circles", objs)
    assert not caption_describes("two red circles", objs)
    assert not caption_describes("three blue circles", objs)
    assert not caption_describes(
        "four red circles", objs[:2] + [ShapeObject("red", "square", 2, 30, 12)] * 2
    )
