"""mini-GenEval prompts, pass rules, scoring and the oracle; understanding exact match."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
from PIL import Image

from training.data.shapes import COLORS, SHAPES, ShapeObject, parse_caption, render
from training.eval import geneval, understanding
from training.eval.detect import detect
from training.eval.geneval import TASKS, Record, check, make_prompts, scene_for_prompt, score

FORMS = {
    "single_object": "single",
    "colors": "single",
    "two_object": "pair",
    "color_attr": "pair",
    "counting": "count",
    "position": "relation",
}
BLANK = np.full((64, 64, 3), 255, dtype=np.uint8)


@pytest.fixture(scope="module")
def prompts() -> list[geneval.Prompt]:
    return make_prompts()


def _oracle(prompt: str, seed: int) -> np.ndarray:
    return scene_for_prompt(prompt, np.random.default_rng(seed)).render()


def test_tasks_order():
    assert TASKS == ("single_object", "colors", "two_object", "color_attr", "counting", "position")


def test_make_prompts_deterministic_and_at_least_25_per_task(prompts):
    assert prompts == make_prompts(seed=0)
    assert prompts != make_prompts(seed=1)
    per_task = collections.Counter(p.task for p in prompts)
    assert set(per_task) == set(TASKS) and min(per_task.values()) >= 25
    for task in ("two_object", "color_attr", "counting", "position"):
        texts = [p.prompt for p in prompts if p.task == task]
        assert len(set(texts)) == len(texts) == 25
    # Small tasks repeat their full prompt set evenly.
    singles = collections.Counter(p.prompt for p in prompts if p.task == "single_object")
    assert set(singles) == {f"a {s}" for s in SHAPES} and len(set(singles.values())) == 1
    colors = collections.Counter(p.prompt for p in prompts if p.task == "colors")
    assert len(colors) == len(COLORS) * len(SHAPES) and len(set(colors.values())) == 1


def test_prompts_follow_task_templates(prompts):
    for p in prompts:
        assert parse_caption(p.prompt) == p.spec
        (c1, s1), *rest = p.spec["objects"]
        assert p.spec["form"] == FORMS[p.task]
        if p.task == "single_object":
            assert c1 is None
        if p.task == "colors":
            assert c1 is not None
        if p.task == "two_object":
            assert s1 != rest[0][1]
        if p.task == "color_attr":
            assert c1 != rest[0][0] and s1 != rest[0][1]


def test_check_passes_ground_truth_and_fails_blank(prompts):
    for p in prompts[::3]:
        for seed in range(3):
            assert check(p.task, p.spec, _oracle(p.prompt, seed)), (p.prompt, seed)
        assert not check(p.task, p.spec, BLANK)


def _recolor(objects, shift: int = 1):
    return [
        dataclasses.replace(o, color=COLORS[(COLORS.index(o.color) + shift) % 6]) for o in objects
    ]


def _reshape(objects):
    return [dataclasses.replace(o, shape=SHAPES[(SHAPES.index(o.shape) + 1) % 3]) for o in objects]


def test_check_fails_wrong_color_or_shape(prompts):
    rng = np.random.default_rng(0)
    for p in prompts:
        objects = scene_for_prompt(p.prompt, rng).objects
        if p.task in ("colors", "color_attr", "position"):
            assert not check(p.task, p.spec, render(_recolor(objects))), p.prompt
        assert not check(p.task, p.spec, render(_reshape(objects))), p.prompt


def test_check_rules_on_hand_built_images():
    def spec(text):
        return parse_caption(text)

    red_circle = ShapeObject("red", "circle", 5, 5, 14)
    blue_square = ShapeObject("blue", "square", 30, 30, 14)
    two = render([red_circle, blue_square])
    assert not check("single_object", spec("a circle"), two)  # exactly one object required
    assert check("two_object", spec("a green circle and a green square"), two)  # colors not judged
    assert not check("color_attr", spec("a blue circle and a red square"), two)
    assert check("color_attr", spec("a red circle and a blue square"), two)
    red_square = ShapeObject("red", "square", 5, 5, 14)
    assert check("counting", spec("two green squares"), render([blue_square, red_square]))
    assert not check("counting", spec("three blue squares"), two)
    assert check("single_object", spec("a circle"), Image.fromarray(render([red_circle])))
    assert check("position", spec("a red circle above a blue square"), two)
    assert check("position", spec("a red circle to the left of a blue square"), two)
    assert not check("position", spec("a red circle below a blue square"), two)
    with pytest.raises(ValueError, match="not a colors prompt"):
        check("colors", spec("a circle"), two)
    with pytest.raises(ValueError, match="unknown mini-GenEval task"):
        check("spelling", spec("a circle"), two)


def test_the_strict_judge_fails_extra_and_miscolored_objects():
    """GenEval's rules pass an image with extra objects; a person (and `check_strict`) does not."""
    from training.eval.geneval import check_strict

    def spec(text):
        return parse_caption(text)

    red_circle = ShapeObject("red", "circle", 5, 5, 14)
    blue_square = ShapeObject("blue", "square", 30, 30, 14)
    extra = ShapeObject("green", "triangle", 5, 40, 14)
    two, three = render([red_circle, blue_square]), render([red_circle, blue_square, extra])
    for task, text in (
        ("two_object", "a green circle and a green square"),
        ("color_attr", "a red circle and a blue square"),
        ("position", "a red circle to the left of a blue square"),
    ):
        assert check(task, spec(text), three) and not check_strict(task, spec(text), three)
        assert check_strict(task, spec(text), two)
    squares = [ShapeObject("blue", "square", x, 30, 12) for x in (2, 20)]
    assert check_strict("counting", spec("two blue squares"), render(squares))
    miscolored = [*squares[:1], ShapeObject("red", "square", 20, 30, 12)]
    assert check("counting", spec("two blue squares"), render(miscolored))  # GenEval: no color
    assert not check_strict("counting", spec("two blue squares"), render(miscolored))
    assert not check_strict("counting", spec("two blue squares"), render([*squares, extra]))
    one = render([red_circle])
    assert not check_strict("two_object", spec("a green circle and a red square"), one)


@pytest.mark.parametrize("dx, passes", [(3, True), (2, False), (-3, False)])
def test_position_offset_threshold(dx, passes):
    a = ShapeObject("red", "square", 10, 5, 12)
    b = ShapeObject("blue", "square", 10 + dx, 30, 12)
    assert check("position", parse_caption("a red square to the left of a blue square"),
                 render([a, b])) is passes  # fmt: skip


def test_score_arithmetic():
    image = BLANK
    fractions = dict(zip(TASKS, (1.0, 0.5, 0.25, 0.0, 0.75, 0.5), strict=True))
    records = [
        Record(task, "p", seed, seed < fraction * 4, image)
        for task, fraction in fractions.items()
        for seed in range(4)
    ]
    scores = score(records)
    assert {t: scores[t] for t in TASKS} == fractions
    assert scores["overall"] == pytest.approx(np.mean(list(fractions.values())))
    # overall is the mean of task scores, not of images: unequal task sizes don't reweight it
    more = records + [Record("single_object", "q", 9, True, image)] * 12
    assert score(more)["overall"] == pytest.approx(scores["overall"])
    with pytest.raises(ValueError, match="position"):
        score([r for r in records if r.task != "position"])


def test_evaluate_oracle_scores_one_and_blank_zero(prompts, tmp_path):
    calls = collections.Counter()

    def oracle(prompt, seed):
        calls[prompt, seed] += 1
        return Image.fromarray(_oracle(prompt, seed)) if seed % 2 else _oracle(prompt, seed)

    result = geneval.evaluate(oracle, prompts)
    assert result["overall"] == 1.0 and all(result[t] == 1.0 for t in TASKS)
    assert len(result["records"]) == 4 * len(prompts)
    assert max(calls.values()) == 1  # repeated prompts reuse their images
    blank = geneval.evaluate(lambda prompt, seed: BLANK, prompts)
    assert blank["overall"] == 0.0
    table = geneval.to_table(result)
    assert all(t in table for t in TASKS) and "overall" in table and "108/108" in table
    path = geneval.save_grid(result["records"][:20], tmp_path / "grid.png", cols=8)
    with Image.open(path) as grid:
        assert grid.size[0] > 8 * 128 and grid.size[1] > 3 * 128


def test_understanding_items_are_consistent_with_pixels():
    items = understanding.make_questions(seed=0, n=150)
    assert len(items) == 150
    again = understanding.make_questions(seed=0, n=150)
    assert all((a[0] == b[0]).all() and a[1:] == b[1:] for a, b in zip(items, again, strict=True))
    kinds = collections.Counter(understanding.question_type(q) for _, q, _ in items)
    assert set(kinds) == {"describe", "count", "color"}
    for image, question, answer in items:
        found = detect(image)
        kind = understanding.question_type(question)
        if kind == "count":
            shape = question.split()[2][:-1]
            assert answer == ["zero", "one", "two", "three", "four"][
                sum(d.shape == shape for d in found)]  # fmt: skip
        elif kind == "color":
            shape = question.rstrip("?").split()[-1]
            assert [d.color for d in found if d.shape == shape] == [answer]
        else:
            spec = parse_caption(answer)
            assert spec["count"] == len(found)
            assert all(color is not None for color, _ in spec["objects"])


def test_exact_match_normalizes_and_scores():
    items = understanding.make_questions(seed=1, n=40)
    truth = {(image.tobytes(), q): a for image, q, a in items}
    perfect = understanding.exact_match(lambda im, q: f"  {truth[im.tobytes(), q].upper()} ", items)
    assert perfect["accuracy"] == 1.0 and perfect["correct"] == perfect["n"] == 40
    wrong = understanding.exact_match(lambda im, q: "seven", items)
    assert wrong["accuracy"] == 0.0 and set(wrong["by_type"].values()) == {0.0}
    counts_only = understanding.exact_match(
        lambda im, q: truth[im.tobytes(), q] if q.startswith("How many") else "", items
    )
    assert counts_only["by_type"]["count"] == 1.0 and counts_only["by_type"]["describe"] == 0.0


def test_descriptions_are_right_when_true_of_the_image():
    """Any canonical caption true of the image counts (a pair in the other order, a relation the
    other way round); one naming the wrong objects does not, and counts stay exact."""
    items = [
        it for it in understanding.make_questions(seed=2, n=200) if it[1] == "Describe the image."
    ]
    pairs = [(im, a) for im, _, a in items if parse_caption(a)["form"] == "pair"]
    assert len(pairs) >= 5

    def swap(answer: str) -> str:
        first, second = answer.split(" and ")
        return f"{second} and {first}"

    alt = {im.tobytes(): swap(a) for im, a in pairs}
    subset = [(im, "Describe the image.", a) for im, a in pairs]
    right = understanding.exact_match(lambda im, q: alt[im.tobytes()], subset)
    assert right["accuracy"] == 1.0
    wrong = understanding.exact_match(
        lambda im, q: alt[im.tobytes()].replace(" and a ", " and a big "), subset
    )
    assert wrong["accuracy"] == 0.0
