"""Understanding evaluation (stage 1): exact-match accuracy on freshly generated held-out scenes.

Items come from generator seeds EVAL_SEED_OFFSET + seed (10**9 + seed), a namespace disjoint from
the training streams' seeds [0, 10**6) (training/data/shapes.py), so no evaluation scene is drawn by
a training generator. Answers are compared after strip() and lower(); a `Describe the image.` answer
is right when it is a canonical caption true of the image (`caption_describes` on the objects the
exact detector finds): a two-object scene has several (either order, either relation direction),
so exact match against the one drawn caption would cap a perfect model near 0.86.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from training.data.shapes import (
    COLOR_QUESTION,
    COUNT_QUESTION,
    DESCRIBE_QUESTION,
    EVAL_SEED_OFFSET,
    caption_describes,
    render,
    sample_qa,
    sample_scene,
)
from training.eval.detect import detect

logger = logging.getLogger(__name__)

QUESTION_TYPES = ("describe", "count", "color")


def make_questions(seed: int, n: int) -> list[tuple[np.ndarray, str, str]]:
    """n held-out (image (64, 64, 3) uint8, question, answer) items, deterministic in seed >= 0."""
    if seed < 0 or n < 1:
        raise ValueError(f"need seed >= 0 and n >= 1, got seed={seed}, n={n}")
    rng = np.random.default_rng(EVAL_SEED_OFFSET + seed)
    items = []
    for _ in range(n):
        scene = sample_scene(rng)
        question, answer = sample_qa(scene, rng)
        items.append((render(scene.objects), question, answer))
    return items


def question_type(question: str) -> str:
    """Which of QUESTION_TYPES a question is."""
    if question == DESCRIBE_QUESTION:
        return "describe"
    for kind, template in (("count", COUNT_QUESTION), ("color", COLOR_QUESTION)):
        prefix, suffix = template.split("{shape}")
        if question.startswith(prefix) and question.endswith(suffix):
            return kind
    raise ValueError(f"question {question!r} is not one of the understanding question templates")


def _normalize(text: str) -> str:
    return text.strip().lower()


def exact_match(
    answer_fn: Callable[[np.ndarray, str], str],
    items: Sequence[tuple[np.ndarray, str, str]],
) -> dict:
    """Score `answer_fn(image, question) -> str` on items from `make_questions` (counts and
    colors exact; descriptions right when true of the image).

    Returns {"accuracy", "correct", "n", "by_type": {type: accuracy}} over the types present.
    """
    if not items:
        raise ValueError("exact_match needs at least one item")
    hits: dict[str, list[bool]] = {kind: [] for kind in QUESTION_TYPES}
    for image, question, answer in items:
        reply, kind = _normalize(answer_fn(image, question)), question_type(question)
        if kind == "describe":
            hit = caption_describes(reply, detect(image))
        else:
            hit = reply == _normalize(answer)
        hits[kind].append(hit)
    correct = sum(sum(v) for v in hits.values())
    result = {
        "accuracy": correct / len(items),
        "correct": correct,
        "n": len(items),
        "by_type": {kind: float(np.mean(v)) for kind, v in hits.items() if v},
    }
    logger.info("understanding exact match %.3f (%d/%d)", result["accuracy"], correct, len(items))
    return result
