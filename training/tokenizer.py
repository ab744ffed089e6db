"""Tokenizers: the tiny variant's byte-level BPE, and a checkpoint's, from whichever files it has.

Real checkpoints bring Qwen2.5's own tokenizer with the three tokens BLIP3-o adds, as a
`tokenizer.json` or, when saved by the slow tokenizer, as `vocab.json` + `merges.txt` from which
`load_tokenizer` builds the fast one (the runtime then gets a `tokenizer.json`). The tiny
one knows the same special tokens (the chat template's, the vision markers, `[IMG]`, `[/IMG]`,
`<image>`) at ids 0..10, in `QWEN_SPECIAL_TOKENS + ADDED_TOKENS` order (the `tiny` preset's ids),
and merges learned from the shapes-world language and the prompt templates. Byte-level, so any
text encodes. Training is deterministic: the same corpus gives the same file.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from training.checkpoint_files import TOKENIZER_FILE, CheckpointError, check_tokenizer_files
from training.config import (
    ADDED_TOKENS,
    GENERATION_INSTRUCTION,
    QWEN_SPECIAL_TOKENS,
    SYSTEM_PROMPT,
    TINY_VOCAB_SIZE,
)

QWEN2_TOKENIZERS = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
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
    """The tokenizer of a checkpoint folder: its `tokenizer.json`, else built from the slow files.

    A folder saved by the slow tokenizer holds `vocab.json` + `merges.txt` (+ the added tokens in
    `tokenizer_config.json` / `added_tokens.json`) and no `tokenizer.json`; the fast tokenizer is
    then built as transformers builds Qwen2's (`tokenizer_from_vocab`). A folder with neither
    raises `CheckpointError` naming the missing files.
    """
    folder = Path(folder)
    check_tokenizer_files(folder)
    path = folder / TOKENIZER_FILE
    if path.is_file():
        return Tokenizer.from_file(str(path))
    return tokenizer_from_vocab(folder)


def _json_file(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def tokenizer_from_vocab(folder: str | Path) -> Tokenizer:
    """Qwen2's fast tokenizer from `vocab.json` + `merges.txt` and the folder's added tokens.

    Byte-level BPE with Qwen2's pre-tokenizer, as `transformers.Qwen2Tokenizer` defines it; the
    added tokens (`added_tokens_decoder` of `tokenizer_config.json`, `added_tokens.json`) must
    land on the ids the files give them.
    """
    from tokenizers import AddedToken
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer

    folder = Path(folder)
    config = _json_file(folder / "tokenizer_config.json")
    kind = config.get("tokenizer_class", QWEN2_TOKENIZERS[0])
    if kind not in QWEN2_TOKENIZERS:
        raise CheckpointError(
            f"{folder / 'tokenizer_config.json'}: tokenizer_class {kind!r} cannot be built from "
            f"vocab.json + merges.txt here; supported: {', '.join(QWEN2_TOKENIZERS)} (or ship a "
            "tokenizer.json)"
        )
    try:
        vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception on bad files
        raise CheckpointError(f"cannot read {folder}/vocab.json + merges.txt: {err}") from err
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges).backend_tokenizer
    added = {int(i): t for i, t in (config.get("added_tokens_decoder") or {}).items()}
    for token, i in _json_file(folder / "added_tokens.json").items():
        added.setdefault(int(i), {"content": token, "special": True})
    for token_id, entry in sorted(added.items()):
        content = entry["content"] if isinstance(entry, dict) else str(entry)
        special = entry.get("special", True) if isinstance(entry, dict) else True
        tokenizer.add_tokens([AddedToken(content, special=special, normalized=not special)])
        if tokenizer.token_to_id(content) != token_id:
            raise CheckpointError(
                f"{folder}: added token {content!r} should have id {token_id}, but vocab.json "
                f"puts it at {tokenizer.token_to_id(content)}"
            )
    return tokenizer


def check_special_tokens(tokenizer: Tokenizer, expected: dict[str, int]) -> None:
    """Raise if a special token is missing or has another id than the config says."""
    for token, token_id in expected.items():
        found = tokenizer.token_to_id(token)
        if found != token_id:
            raise ValueError(f"tokenizer maps {token!r} to {found}, the config expects {token_id}")
