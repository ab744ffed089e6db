from training.config import ADDED_TOKENS, QWEN_SPECIAL_TOKENS, TINY_VOCAB_SIZE
from training.tokenizer import build_tiny_tokenizer, check_special_tokens


def test_special_tokens_have_the_preset_ids(tiny_tokenizer, tiny_config):
    b = tiny_config.backbone
    check_special_tokens(
        tiny_tokenizer,
        {"[IMG]": b.img_token_id, "<|im_end|>": b.eos_token_id, "<|image_pad|>": b.image_token_id},
    )
    for i, token in enumerate(QWEN_SPECIAL_TOKENS + ADDED_TOKENS):
        assert tiny_tokenizer.token_to_id(token) == i
    assert tiny_tokenizer.get_vocab_size() <= TINY_VOCAB_SIZE


def test_training_is_deterministic(tiny_tokenizer):
    assert build_tiny_tokenizer().to_str() == tiny_tokenizer.to_str()


def test_any_text_round_trips(tiny_tokenizer):
    text = "<|im_start|>user\nA zebra, ünïcode & 123 [IMG]<|im_end|>"
    enc = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.token_to_id("[IMG]") in enc.ids
    assert tiny_tokenizer.decode(enc.ids, skip_special_tokens=False) == text


def test_special_token_mismatch_is_reported(tiny_tokenizer):
    import pytest

    with pytest.raises(ValueError, match=r"maps '\[IMG\]' to 8, the config expects 151665"):
        check_special_tokens(tiny_tokenizer, {"[IMG]": 151665})
