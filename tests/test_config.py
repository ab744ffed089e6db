import dataclasses
import json

import pytest

from training.config import (
    PRESETS,
    DiTConfig,
    SamplerConfig,
    from_dict,
    from_preset,
    pooling_factor,
    to_dict,
)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*tiny, 4b, 8b"):
        from_preset("huge")


def test_override_replaces_whole_field_and_rejects_unknown():
    cfg = from_preset("tiny", sampler=SamplerConfig(steps=5))
    assert cfg.sampler.steps == 5
    with pytest.raises(ValueError, match="unknown override"):
        from_preset("tiny", nonsense=1)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_consistent_and_round_trip(name):
    cfg = from_preset(name)
    assert cfg.backbone.n_query == 64 and cfg.dit.num_tokens == 64
    assert cfg.target_encoder.num_tokens == 64
    assert sum(cfg.backbone.mrope_section) * 2 == cfg.backbone.head_dim
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_published_numbers():
    b4, b8 = from_preset("4b"), from_preset("8b")
    assert (b4.backbone.hidden_size, b4.backbone.num_layers, b4.backbone.num_kv_heads) == (
        2048,
        36,
        2,
    )
    assert (b8.backbone.hidden_size, b8.backbone.num_layers, b8.backbone.num_kv_heads) == (
        3584,
        28,
        4,
    )
    assert b4.dit.ffn_inner_dim == 4864 and b4.dit.head_dim == 64
    assert b4.decoder.projection_class_embeddings_input_dim == 3328
    assert b4.decoder.latent_size == 128 and b4.decoder.time_ids == (1024, 1024, 0, 0, 1024, 1024)
    assert b4.target_encoder.grid == 32 and b4.target_encoder.pool_factor == 4


def test_inconsistent_config_is_rejected():
    cfg = from_preset("tiny")
    with pytest.raises(ValueError, match="latent_embedding_size"):
        dataclasses.replace(cfg, dit=DiTConfig(latent_embedding_size=7))


def test_pooling_names():
    assert pooling_factor("early_pool2d_4") == 4
    with pytest.raises(ValueError, match="unknown pooling"):
        pooling_factor("max_pool")


def test_decoder_negative_is_checked_and_old_configs_take_the_presets():
    with pytest.raises(ValueError, match=r"decoder_negative 'blank'.*blank_prompt, zeros"):
        SamplerConfig(decoder_negative="blank")
    for name in PRESETS:
        data = to_dict(from_preset(name))
        del data["sampler"]["decoder_negative"]  # a config.json written before the field
        assert from_dict(data).sampler == from_preset(name).sampler
        del data["sampler"]
        assert from_dict(data).sampler == from_preset(name).sampler
    assert (
        from_preset("tiny").sampler.decoder_negative != from_preset("4b").sampler.decoder_negative
    )
