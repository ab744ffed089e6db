"""The diagnosis' judgments of single images and feature maps (training.train.diagnose)."""

from __future__ import annotations

import numpy as np
import torch

from training.data.shapes import COLORS, ShapeObject, parse_caption, render
from training.train.diagnose import (
    BACKGROUND,
    cell_labels,
    failures,
    feature_objects,
    fit_linear,
    off_palette_fraction,
    predict,
)

RED_CIRCLE = ShapeObject("red", "circle", 4, 20, 16)
BLUE_SQUARE = ShapeObject("blue", "square", 40, 22, 16)


def judge(task: str, prompt: str, *objects: ShapeObject) -> list[str]:
    return failures(task, parse_caption(prompt), render(objects))


def test_a_right_image_has_no_failures():
    prompt = "a red circle to the left of a blue square"
    assert judge("position", prompt, RED_CIRCLE, BLUE_SQUARE) == []
    assert judge("color_attr", "a red circle and a blue square", RED_CIRCLE, BLUE_SQUARE) == []


def test_each_kind_of_wrong_picture_is_named():
    prompt = "a red circle to the left of a blue square"
    swapped = (ShapeObject("red", "circle", 40, 20, 16), ShapeObject("blue", "square", 4, 22, 16))
    assert judge("position", prompt, *swapped) == ["misplaced"]
    extra = ShapeObject("green", "triangle", 24, 44, 14)
    assert judge("position", prompt, RED_CIRCLE, BLUE_SQUARE, extra) == ["extra"]
    assert judge("position", prompt, RED_CIRCLE) == ["missing"]
    green_circle = ShapeObject("green", "circle", 4, 20, 16)
    assert judge("color_attr", "a red circle and a blue square", green_circle, BLUE_SQUARE) == [
        "miscolored"
    ]
    assert judge("counting", "two blue squares", BLUE_SQUARE) == ["miscount"]


def test_off_palette_ink_is_measured_and_flags_a_smear():
    image = render((RED_CIRCLE,))
    assert off_palette_fraction(image) == 0.0
    assert off_palette_fraction(np.full((64, 64, 3), 255, np.uint8)) == 0.0
    smeared = image.copy()
    smeared[0:20, 0:20] = (120, 120, 120)  # grey: ink, no palette color
    assert off_palette_fraction(smeared) > 0.5
    assert "smeared" in failures("colors", parse_caption("a red circle"), smeared)


def test_cell_labels_and_objects_read_from_a_cell_map():
    image = render((RED_CIRCLE, BLUE_SQUARE))
    cells = cell_labels(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0]
    red, blue = COLORS.index("red"), COLORS.index("blue")
    assert set(cells.tolist()) == {red, blue, BACKGROUND}
    assert cells.view(8, 8)[3, 1] == red and cells.view(8, 8)[3, 6] == blue
    assert feature_objects(cells) == 2
    split = cells.clone().view(8, 8)
    split[:, 1] = BACKGROUND  # cut the red object in two columns apart
    assert feature_objects(split.flatten()) >= 2


def test_linear_probe_fits_a_separable_problem_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = (x[:, 0] > 0).long()
    probe = fit_linear(x[:300], y[:300], 2)
    assert (predict(probe, x[300:]) == y[300:]).float().mean() > 0.95
    noise = torch.randint(0, 2, (400,), generator=g)
    probe = fit_linear(x[:300], noise[:300], 2)
    assert (predict(probe, x[300:]) == noise[300:]).float().mean() < 0.7


def test_objects_read_from_a_true_cell_map_pass_the_judges():
    from training.data.shapes import Scene
    from training.eval.geneval import passes
    from training.train.diagnose import object_cells, read_objects

    caption = "a red circle to the left of a blue square"
    scene = Scene((RED_CIRCLE, BLUE_SQUARE), caption, "relation")
    found = read_objects(object_cells([scene])[0])
    assert sorted((d.color, d.shape) for d in found) == [("blue", "square"), ("red", "circle")]
    spec = parse_caption(scene.caption)
    assert passes("position", spec, found, strict=True)
    wrong = parse_caption("a red circle to the right of a blue square")
    assert not passes("position", wrong, found)


def test_the_target_encoder_round_trips_beside_a_checkpoint(tmp_path):
    import pytest

    from training.config import from_preset
    from training.model.target_encoder import TargetEncoder
    from training.train.publish import load_target_encoder_folder, save_target_encoder

    torch.manual_seed(0)
    encoder = TargetEncoder(from_preset("tiny").target_encoder).eval()
    stats = {"mean": torch.randn(32), "std": torch.rand(32) + 0.5}
    save_target_encoder(encoder, stats, tmp_path / "target_encoder")
    loaded, loaded_stats = load_target_encoder_folder(tmp_path / "target_encoder")
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded(loaded.normalize(images)), encoder(encoder.normalize(images)))
    torch.testing.assert_close(loaded_stats["std"], stats["std"])
    with pytest.raises(FileNotFoundError, match="no target encoder"):
        load_target_encoder_folder(tmp_path / "missing")
