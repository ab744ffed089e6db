"""The tiny variant's tokenizer: a real byte-level BPE `tokenizer.json` (tokenizers library).

Real checkpoints bring Qwen2.5's own tokenizer.json with the three tokens BLIP3-o adds. The tiny
one knows the same special tokens (the chat template's, the vision markers, `[IMG]`, `[/IMG]`,
`<image>`) at ids 0..10, in `QWEN_SPECIAL_TOKENS + ADDED_TOKENS` order (the `tiny` preset's ids),
and merges learned from the shapes-world language and the prompt templates. Byte-level, so any
text encodes. Training is deterministic: the same corpus gives the same file.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from training.config import (
    ADDED_TOKENS,
    GENERATION_INSTRUCTION,
    QWEN_SPECIAL_TOKENS,
    SYSTEM_PROMPT,
    TINY_VOCAB_SIZE,
)

_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
_SHAPES = ("circle", "square", "triangle")
_NUMBERS = ("zero", "one", "two", "three", "four")
_RELATIONS = ("to the left of", "to the right of", "above", "below")


def tiny_corpus() -> list[str]:
    """Deterministic text covering the prompt templates and the shapes-world language."""
    lines = [SYSTEM_PROMPT, "system", "user", "assistant", "\n"]
    for color, shape in itertools.product(_COLORS, _SHAPES):
        caption = f"a {color} {shape}"
        lines += [caption, GENERATION_INSTRUCTION.format(caption=caption)]
        lines += [f"{n} {color} {shape}s" for n in _NUMBERS[2:]]
        lines += [f"What color is the {shape}?", f"How many {shape}s are there?"]
        for rel, (c2, s2) in itertools.product(_RELATIONS, [("blue", "circle"), ("red", "square")]):
            lines.append(f"a {color} {shape} {rel} a {c2} {s2}")
            lines.append(f"a {color} {shape} and a {c2} {s2}")
    lines += ["Describe the image.", *_NUMBERS, *_COLORS, *_SHAPES]
    return lines


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> Tokenizer:
    """Train the tiny byte-level BPE; special tokens get ids 0..10."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS + ADDED_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer)
    return tokenizer


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The `tokenizer.json` of a checkpoint or engine folder."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder}")
    return Tokenizer.from_file(str(path))


def check_special_tokens(tokenizer: Tokenizer, expected: dict[str, int]) -> None:
    """Raise if a special token is missing or has another id than the config says."""
    for token, token_id in expected.items():
        found = tokenizer.token_to_id(token)
        if found != token_id:
            raise ValueError(f"tokenizer maps {token!r} to {found}, the config expects {token_id}")
