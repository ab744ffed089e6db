"""Stage 1 reads captions: caption rows, the reader's labels, the gate before stage 2, and EMA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from training.config import from_preset
from training.data.shapes import format_caption, parse_caption, sample_spec
from training.model.backbone import generation_ids
from training.model.blip3o import BLIP3o
from training.tokenizer import build_tiny_tokenizer
from training.train import gate
from training.train.backbone import (
    IGNORE,
    READER_SLOTS,
    Stage1Objective,
    UnderstandingBatcher,
    caption_batch,
    caption_labels,
    caption_token_mask,
    conditioning,
    generation_prompt_batch,
)
from training.train.common import EmaWeights, final_weights


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = from_preset("tiny")
    return BLIP3o(cfg).eval(), build_tiny_tokenizer(), cfg


def _captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [format_caption(sample_spec(rng)) for _ in range(n)]


def test_caption_token_mask_selects_exactly_the_caption(tiny):
    _, tok, cfg = tiny
    for caption in _captions(40) + ["a circle", "four purple triangles"]:
        ids = generation_ids(tok, caption, cfg.backbone)
        mask = caption_token_mask(tok, caption, cfg)
        assert len(mask) == len(ids) and not mask[-1]  # [IMG] is not the caption's
        picked = [i for i, m in zip(ids, mask) if m]
        assert tok.decode(picked).strip() == caption
        first = mask.index(True)
        assert all(mask[first : first + len(picked)])  # one contiguous span


def test_reader_labels_round_trip_the_caption_structure():
    for caption in _captions(200, seed=1):
        labels = caption_labels(caption)
        values = {slot: READER_SLOTS[slot][i] for slot, i in zip(READER_SLOTS, labels)}
        spec = parse_caption(caption)
        assert values["form"] == spec["form"] and values["relation"] == spec["relation"]
        assert (values["color1"], values["shape1"]) == spec["objects"][0]
        if len(spec["objects"]) == 2:
            assert (values["color2"], values["shape2"]) == spec["objects"][1]
        else:
            assert values["color2"] is None and values["shape2"] is None


def test_caption_batch_labels_only_caption_tokens_of_left_padded_rows(tiny):
    _, tok, cfg = tiny
    captions = ["a red circle", "a blue square to the left of a green triangle"]
    batch = caption_batch(tok, cfg, captions)
    ids, labels, mask = batch["caption_ids"], batch["caption_labels"], batch["caption_mask"]
    assert ids.shape == labels.shape and (ids[:, -1] == cfg.backbone.img_token_id).all()
    for row, caption in enumerate(captions):
        picked = ids[row][labels[row] != IGNORE].tolist()
        assert tok.decode(picked).strip() == caption
        assert (labels[row][mask[row] == 0] == IGNORE).all()  # pads carry no label
    assert batch["reader_labels"].shape == (2, len(READER_SLOTS))


def test_stage1_objective_trains_the_queries_through_caption_rows(tiny):
    model, tok, cfg = tiny
    model = BLIP3o(cfg)
    objective = Stage1Objective(model, lm_weight=1.0, read_weight=1.0)
    from training.data.shapes import sample_scene

    rng = np.random.default_rng(0)
    chats = UnderstandingBatcher(cfg, tok)([sample_scene(rng) for _ in range(2)], rng)
    loss, metrics = objective(**chats, **caption_batch(tok, cfg, _captions(3)))
    assert torch.isfinite(loss) and {"caption_lm", "read", "read_acc"} <= set(metrics)
    loss.backward()
    assert model.latent_queries.grad is not None and model.latent_queries.grad.abs().sum() > 0
    alone, _ = Stage1Objective(model, 1.0, 1.0)(**chats)  # no caption rows: chats only
    assert alone.item() < loss.item()


def test_conditioning_of_padded_batch_equals_single_prompts(tiny):
    model, tok, cfg = tiny
    captions = ["a red circle", "two green squares", "a circle"]
    prompts = generation_prompt_batch(tok, cfg, captions)
    batched = conditioning(model, prompts["input_ids"], prompts["prompt_mask"])
    for i, caption in enumerate(captions):
        one = generation_prompt_batch(tok, cfg, [caption])
        single = conditioning(model, one["input_ids"], one["prompt_mask"])
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- the gate


def test_ridge_probe_can_pass_and_fail():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    separable = np.eye(3)[labels] * 0.01 + rng.normal(size=(300, 3)) * 1e-4  # tiny scale
    assert (
        gate._ridge_accuracy(separable[:200], labels[:200], separable[200:], labels[200:], 3) == 1.0
    )
    noise = rng.normal(size=(300, 8))
    assert gate._ridge_accuracy(noise[:200], labels[:200], noise[200:], labels[200:], 3) < 0.6


def test_gate_pairs_differ_in_exactly_their_attribute():
    for kind in ("color", "shape", "relation", "count"):
        pairs = gate._pairs(kind)
        assert len(pairs) >= 18
        for a, b in pairs:
            pa, pb = parse_caption(a), parse_caption(b)
            assert pa != pb and pa["form"] == pb["form"]
            if kind == "count":
                assert pa["objects"] == pb["objects"] and pa["count"] != pb["count"]
            elif kind == "relation":
                assert pa["objects"] == pb["objects"] and pa["relation"] != pb["relation"]
            else:
                index = 0 if kind == "color" else 1
                (ca,), (cb,) = pa["objects"], pb["objects"]
                assert ca[index] != cb[index] and ca[1 - index] == cb[1 - index]


def test_untrained_backbone_fails_the_gate_and_stage2_refuses(tiny, tmp_path):
    model, tok, _ = tiny
    report = gate.probe(model, tok, probe_captions=150)
    assert {"shape_vs_color", "relation_vs_color", "count_vs_color", "shape_probe"} <= set(report)
    assert all(np.isfinite(v) for k, v in report.items() if isinstance(v, float))
    failed = {**report, "shape_probe": 0.5}
    assert gate.check_gate(failed) and "shape_probe 0.500 < 0.9" in gate.check_gate(failed)[-1]
    assert not gate.check_gate({**report, "shape_vs_color": 0.5, "shape_probe": 0.95})
    text = gate.format_gate(failed)
    assert "FAILED" in text and "shape/color separation" in text


def test_gate_run_writes_its_report_and_refuses_unless_forced(tiny, tmp_path, monkeypatch):
    model, tok, _ = tiny
    bad = {"shape_vs_color": 0.01, "relation_vs_color": 0.0, "count_vs_color": 0.1,
           "shape_probe": 0.4, "shape_probe_chance": 0.35, "distances": {},
           "captions": {"fit": 1, "held_out": 1}}  # fmt: skip
    monkeypatch.setattr(gate, "probe", lambda *a, **k: dict(bad))
    with pytest.raises(gate.GateError, match=r"shape_vs_color 0\.010 < 0\.3.*--force-gate"):
        gate.gate_run(model, tok, tmp_path, force=False)
    assert json.loads((tmp_path / gate.GATE_FILE).read_text())["passed"] is False
    report = gate.gate_run(model, tok, tmp_path, force=True)
    assert report["forced"] and not report["passed"]
    monkeypatch.setattr(
        gate, "probe", lambda *a, **k: {**bad, "shape_vs_color": 0.4, "shape_probe": 0.95}
    )
    assert gate.gate_run(model, tok, tmp_path, force=False)["passed"]


# ---------------------------------------------------------------- EMA


def test_ema_averages_swaps_and_overlays_final_weights():
    layer = nn.Linear(2, 2)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    ema = EmaWeights({"layer": layer, "frozen": frozen}, 0.5, None)
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update(step=100)  # decay min(0.5, 101/110) = 0.5
    torch.testing.assert_close(ema.avg["layer"]["weight"], start + 0.5)
    assert ema.avg["frozen"] == {}  # only trained parameters are averaged
    live = layer.weight.detach().clone()
    with ema.swapped():
        torch.testing.assert_close(layer.weight.detach(), start + 0.5)
    torch.testing.assert_close(layer.weight.detach(), live)
    state = {"model": {"layer": layer.state_dict()}, "ema": ema.state()}
    weights = final_weights(state, "layer")
    torch.testing.assert_close(weights["weight"], start + 0.5)
    torch.testing.assert_close(weights["bias"], layer.bias.detach())
    again = EmaWeights({"layer": layer}, 0.5, ema.state())  # resumed from a checkpoint
    torch.testing.assert_close(again.avg["layer"]["weight"], start + 0.5)
    with pytest.raises(ValueError, match="ema decay"):
        EmaWeights({"layer": layer}, 1.0, None)


def test_multi_turn_chats_label_every_answer_and_only_answers(tiny):
    from training.data.shapes import questions, sample_scene
    from training.model.backbone import understanding_text

    _, tok, cfg = tiny
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng) for _ in range(4)]
    one = UnderstandingBatcher(cfg, tok)(scenes, np.random.default_rng(0))
    four = UnderstandingBatcher(cfg, tok, turns=4)(scenes, np.random.default_rng(0))
    eos = cfg.backbone.eos_token_id
    for i, scene in enumerate(scenes):
        labels = [t for t in four["labels"][i].tolist() if t != IGNORE]
        answers = tok.decode(labels, skip_special_tokens=False).split("<|im_end|>")[:-1]
        assert len(answers) == min(4, len(questions(scene)))
        assert set(answers) <= {a for _, a in questions(scene)}
        assert labels.count(eos) == len(answers)
        assert sum(t != IGNORE for t in one["labels"][i].tolist()) < len(labels)
        # the first turn is the single-question chat's layout: image, question, answer
        text = tok.decode(four["input_ids"][i].tolist(), skip_special_tokens=False)
        first_question = text.split("<|vision_end|>")[1].split("<|im_end|>")[0]
        assert text.startswith(understanding_text(first_question, text.count("<|image_pad|>")))
    with pytest.raises(ValueError, match="turns"):
        UnderstandingBatcher(cfg, tok, turns=0)
