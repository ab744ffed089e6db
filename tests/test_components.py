"""Output shapes of every tiny component, and the generation input the backbone sees."""

import torch

from training.model.backbone import generation_ids, generation_text, text_positions
from training.model.target_encoder import TargetEncoder, pool_tokens


def test_generation_prompt_is_blip3o_template(tiny_config, tiny_tokenizer):
    text = generation_text("a red circle")
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Please generate image based on the following caption: a red circle<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = generation_ids(tiny_tokenizer, "a red circle", tiny_config.backbone)
    assert ids[-1] == tiny_config.backbone.img_token_id
    assert ids[0] == tiny_tokenizer.token_to_id("<|im_start|>")
    blank = generation_ids(tiny_tokenizer, "", tiny_config.backbone, template=False)
    assert blank == [tiny_config.backbone.img_token_id]


def test_conditioning_shape_and_positions(tiny_pipeline, tiny_config):
    cond = tiny_pipeline.conditioning("a blue square")
    assert cond.shape == (1, 64, tiny_config.backbone.hidden_size)
    pos = text_positions(2, 5)
    assert pos.shape == (3, 2, 5) and torch.equal(pos[2, 1], torch.arange(5))


def test_conditioning_is_last_hidden_after_norm_at_query_positions(tiny_pipeline):
    """Cross-check against transformers' own forward with output_hidden_states."""
    model = tiny_pipeline.model
    ids = torch.tensor([generation_ids(tiny_pipeline.tokenizer, "a", model.config.backbone)])
    embeds = torch.cat([model.qwen.model.language_model.embed_tokens(ids), model.latent_queries], 1)
    with torch.no_grad():
        out = model.qwen.model.language_model(inputs_embeds=embeds, output_hidden_states=True)
        torch.testing.assert_close(model.conditioning(ids), out.hidden_states[-1][:, -64:])


def test_dit_velocity_shape(tiny_pipeline, tiny_config):
    c = tiny_config.feature_width
    v = tiny_pipeline.model.velocity(
        torch.randn(2, c, 8, 8), torch.tensor([1000, 10]), torch.randn(2, 64, 128)
    )
    assert v.shape == (2, c, 8, 8)


def test_target_encoder_gives_64_tokens(tiny_config):
    enc = TargetEncoder(tiny_config.target_encoder)
    feats = enc(enc.normalize(torch.rand(2, 3, 64, 64)))
    assert feats.shape == (2, 64, tiny_config.feature_width)


def test_pooling_is_row_major_average():
    tokens = torch.arange(16.0).view(1, 16, 1)  # 4x4 grid, values = row*4 + col
    pooled = pool_tokens(tokens, 4, 2)
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_decoder_shapes(tiny_pipeline, tiny_config):
    dec = tiny_pipeline.decoder
    s = tiny_config.decoder.latent_size
    eps = dec.epsilon(torch.randn(2, 4, s, s), torch.tensor([999, 1]), torch.randn(2, 64, 32))
    assert eps.shape == (2, 4, s, s)
    img = dec.decode_latents(torch.randn(1, 4, s, s))
    assert img.shape == (1, 3, 64, 64) and 0 <= img.min() and img.max() <= 1
