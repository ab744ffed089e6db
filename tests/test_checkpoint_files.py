"""Damaged checkpoints are one-line errors naming the file; the decoder's scheduler is checked.

A tiny checkpoint in the published form is written once; each test copies it and damages one
thing (a truncated or corrupted shard, a missing shard, a wrong index size, missing tokenizer
files, a scheduler config that differs from the preset). Every case must end in
`CheckpointError` from `verify_checkpoint`, which reads headers only.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import training.checkpoint as ckpt
from training.checkpoint_files import read_header
from training.decoder_folder import settle_scheduler
from training.model.blip3o import BLIP3o
from training.model.decoder import Decoder
from training.published import write_published
from training.tokenizer import load_tokenizer


def shard_name(folder, i: int) -> str:
    """The i-th (1-based) shard file of a sharded folder, as its index names it."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))[i - 1]


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_config, tiny_tokenizer):
    torch.manual_seed(5)
    model, decoder = BLIP3o(tiny_config).eval(), Decoder(tiny_config.decoder).eval()
    folder = tmp_path_factory.mktemp("files") / "ckpt"
    write_published(model, decoder, tiny_tokenizer, folder, max_shard_bytes=1 << 20)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 5
    return folder


@pytest.fixture
def copy(source, tmp_path):
    return shutil.copytree(source, tmp_path / "ckpt")


def test_an_intact_checkpoint_passes(copy, tiny_config):
    ckpt.verify_checkpoint(copy, tiny_config)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_length(path):
    data = bytearray(path.read_bytes())
    data[:8] = (1 << 40).to_bytes(8, "little")
    path.write_bytes(bytes(data))


def _bad_json(path):
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{["
    path.write_bytes(bytes(data))


def _appended(path):
    path.write_bytes(path.read_bytes() + b"\0" * 16)


def _tiny(path):
    path.write_bytes(b"\x01\x02")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (_truncate, r"is truncated: \d+ bytes, its header describes \d+"),
        (_bad_length, r"not a valid safetensors file: its header claims"),
        (_bad_json, r"corrupted safetensors header"),
        (_appended, r"has bytes past its last tensor"),
        (_tiny, r"is truncated: 2 bytes"),
    ],
    ids=["truncated", "bad-length", "bad-json", "appended", "two-bytes"],
)
def test_a_damaged_shard_is_named(copy, tiny_config, damage, match):
    shard = shard_name(copy, 2)
    damage(copy / shard)
    with pytest.raises(ckpt.CheckpointError, match=match) as err:
        ckpt.verify_checkpoint(copy, tiny_config)
    assert shard in str(err.value) and "\n" not in str(err.value)


def test_a_shard_missing_from_the_index(copy, tiny_config):
    shard = shard_name(copy, 2)
    (copy / shard).unlink()
    with pytest.raises(ckpt.CheckpointError, match=rf"lists shard\(s\) missing.*\['{shard}'\]"):
        ckpt.verify_checkpoint(copy, tiny_config)


def test_the_index_total_size_is_checked(copy, tiny_config):
    path = copy / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["metadata"]["total_size"] += 2
    path.write_text(json.dumps(index))
    with pytest.raises(ckpt.CheckpointError, match=r"total_size is \d+ bytes, but the shards'"):
        ckpt.verify_checkpoint(copy, tiny_config)
    index["metadata"]["total_size"] -= 2
    key = next(k for k, f in index["weight_map"].items() if f == shard_name(copy, 2))
    index["weight_map"][key] = shard_name(copy, 1)
    path.write_text(json.dumps(index))
    with pytest.raises(ckpt.CheckpointError, match=rf"shards do not hold.*{key}"):
        ckpt.verify_checkpoint(copy, tiny_config)


def test_read_header_gives_dtypes_and_sizes(source):
    tensors = read_header(source / shard_name(source, 2))
    assert tensors and all(t.dtype == "BF16" and t.nbytes % 2 == 0 for t in tensors.values())


def test_decoder_weights_under_no_accepted_name(copy, tiny_config):
    unet = copy / "diffusion-decoder" / "unet"
    (unet / "diffusion_pytorch_model.bf16.safetensors").rename(unet / "model.bin")
    with pytest.raises(ckpt.CheckpointError, match=r"unet has no weight file; expected one of: "
                       r"diffusion_pytorch_model.safetensors, .*bf16.safetensors"):  # fmt: skip
        ckpt.verify_checkpoint(copy, tiny_config)


def test_plain_decoder_weights_load_too(copy, tiny_config):
    for part in ("unet", "vae"):
        sub = copy / "diffusion-decoder" / part
        (sub / "diffusion_pytorch_model.bf16.safetensors").rename(
            sub / "diffusion_pytorch_model.safetensors"
        )
    pipe = ckpt.load_pipeline(copy)
    assert pipe.decoder.unet.conv_in.weight.dtype == torch.float32


@pytest.mark.parametrize(
    ("remove", "match"),
    [
        (("merges.txt",), r"has no tokenizer.json, and no merges.txt to build it from"),
        (("vocab.json", "merges.txt"), r"and no vocab.json \+ merges.txt to build it from"),
    ],
)
def test_a_missing_tokenizer_names_the_files(copy, tiny_config, remove, match):
    for name in remove:
        (copy / name).unlink()
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.verify_checkpoint(copy, tiny_config)
    with pytest.raises(ckpt.CheckpointError, match=match):
        load_tokenizer(copy)


def test_added_tokens_must_keep_their_ids(copy):
    path = copy / "tokenizer_config.json"
    config = json.loads(path.read_text())
    entry = config["added_tokens_decoder"].pop("6")  # <|image_pad|>
    config["added_tokens_decoder"]["600"] = entry
    path.write_text(json.dumps(config))
    with pytest.raises(ckpt.CheckpointError, match=r"'<\|image_pad\|>' should have id 600.* at 6"):
        load_tokenizer(copy)


def _scheduler(folder, **changes):
    path = folder / "diffusion-decoder" / "scheduler" / "scheduler_config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_a_differing_scheduler_names_both_values(copy, tiny_config):
    _scheduler(copy, timestep_spacing="trailing", steps_offset=None)  # absent: diffusers' 0
    with pytest.raises(ckpt.CheckpointError) as err:
        settle_scheduler(copy / "diffusion-decoder", tiny_config)
    text = str(err.value)
    assert "timestep_spacing = 'trailing' (the tiny preset: 'leading')" in text
    assert "steps_offset = 0 (the tiny preset: 1)" in text and "--decoder-scheduler" in text
    adopted = settle_scheduler(copy / "diffusion-decoder", tiny_config, "checkpoint")
    assert (adopted.decoder.timestep_spacing, adopted.decoder.steps_offset) == ("trailing", 0)
    assert settle_scheduler(copy / "diffusion-decoder", tiny_config, "preset") == tiny_config
    with pytest.raises(ckpt.CheckpointError, match="timestep_spacing = 'trailing'"):
        ckpt.load_pipeline(copy)  # the reference pipeline checks too


def test_a_scheduler_the_runtime_cannot_follow(copy, tiny_config):
    _scheduler(copy, use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ckpt.CheckpointError, match=r"cannot follow use_karras_sigmas = True.*"
                       r"beta_schedule = 'squaredcos_cap_v2' \(supported"):  # fmt: skip
        settle_scheduler(copy / "diffusion-decoder", tiny_config, "checkpoint")
    assert settle_scheduler(copy / "diffusion-decoder", tiny_config, "preset") == tiny_config
