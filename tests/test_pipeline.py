"""The reference pipeline on random tiny weights: deterministic, validated, right shapes."""

import copy
import dataclasses

import numpy as np
import pytest
from PIL import Image

FAST = dict(steps=3, decoder_steps=3)


@pytest.mark.slow
def test_generate_is_deterministic_for_a_seed(tiny_pipeline):
    a = np.asarray(tiny_pipeline.generate("a red circle", seed=3, **FAST))
    b = np.asarray(tiny_pipeline.generate("a red circle", seed=3, **FAST))
    c = np.asarray(tiny_pipeline.generate("a red circle", seed=4, **FAST))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.slow
def test_num_images_gives_distinct_images(tiny_pipeline):
    images = tiny_pipeline.generate("two blue squares", seed=0, num_images=2, **FAST)
    assert len(images) == 2 and all(isinstance(i, Image.Image) for i in images)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def _with_negative(pipe, mode: str):
    """The same modules with another `sampler.decoder_negative`."""
    other = copy.copy(pipe)
    other.config = dataclasses.replace(
        pipe.config, sampler=dataclasses.replace(pipe.config.sampler, decoder_negative=mode)
    )
    other._negative = None
    return other


def test_negative_features_follow_the_setting_and_are_cached(tiny_pipeline):
    blank = _with_negative(tiny_pipeline, "blank_prompt")
    neg = blank.negative_features()
    assert neg.shape == (1, 64, tiny_pipeline.config.feature_width)
    assert blank.negative_features() is neg
    assert neg.abs().max() > 0
    zeros = _with_negative(tiny_pipeline, "zeros").negative_features()
    assert zeros.shape == neg.shape and not zeros.any()


def test_the_decoder_negative_changes_the_image(tiny_pipeline):
    images = [
        np.asarray(_with_negative(tiny_pipeline, m).generate("a red circle", **FAST))
        for m in ("blank_prompt", "zeros")
    ]
    assert not np.array_equal(*images)


def test_answer_is_deterministic(tiny_pipeline):
    image = np.full((64, 64, 3), 255, np.uint8)
    image[10:30, 10:30] = (220, 40, 40)
    a = tiny_pipeline.answer(image, "Describe the image.", max_new_tokens=5)
    b = tiny_pipeline.answer(Image.fromarray(image), "Describe the image.", max_new_tokens=5)
    assert isinstance(a, str) and a == b


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(prompt=3), TypeError, "prompt must be a str"),
        (dict(prompt="a", steps=0), ValueError, "steps must be an integer >= 1"),
        (dict(prompt="a", guidance=float("nan")), ValueError, "guidance must be a finite"),
        (dict(prompt="a", decoder_guidance=-1.0), ValueError, "decoder_guidance"),
        (dict(prompt="a", seed=-5), ValueError, "seed"),
    ],
)
def test_generate_rejects_bad_input(tiny_pipeline, kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny_pipeline.generate(**kwargs)


def test_answer_rejects_bad_images(tiny_pipeline, tmp_path):
    bogus = tmp_path / "not_an_image.png"
    bogus.write_text("hello")
    with pytest.raises(ValueError, match="cannot read an image"):
        tiny_pipeline.answer(bogus, "Describe the image.")
    with pytest.raises(ValueError, match="1x1"):
        tiny_pipeline.answer(np.zeros((1, 1, 3), np.uint8), "Describe the image.")
    with pytest.raises(TypeError, match="question must be a str"):
        tiny_pipeline.answer(np.zeros((64, 64, 3), np.uint8), None)
