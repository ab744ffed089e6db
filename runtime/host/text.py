"""Host-side text: the tokenizer (`tokenizers`) and the prompt templates recorded in the manifest.

Generation: the caption is wrapped in the generation instruction and the chat template, encoded,
and `[IMG]` is appended (its embedding is then followed by the 64 latent queries). The decoder's
negative features use the raw blank prompt (no template). Understanding: one image's merged patch
tokens (`<|image_pad|>` repeated) between the vision markers, then the question, in the chat.

User text (a caption, a question) is always text: a `<|im_end|>` or `<|image_pad|>` typed by a
user is encoded as its characters, never as the control token, so it can neither open a chat turn
nor claim image slots. Only the template's own special tokens are parsed. The tokenizer splits on
special tokens before anything else, so encoding each run between them on its own gives the same
ids as one pass over the whole string.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from runtime import validate
from runtime.folder.manifest import EngineFolderError

_SLOT = "\ue000"  # a private-use character: where the user text goes in a rendered template


class PromptEncoder:
    def __init__(self, tokenizer: Tokenizer, template: dict, backbone: dict) -> None:
        self.tokenizer = tokenizer
        self.template = template
        # A copy that reads special-token strings as text (the shared one is not mutated).
        self.literal = Tokenizer.from_str(tokenizer.to_str())
        self.literal.encode_special_tokens = True
        self.special = {
            t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        }
        names = sorted(self.special, key=len, reverse=True)
        alternatives = "|".join(map(re.escape, names))
        self._special_re = re.compile(f"({alternatives})") if names else None
        self.img_token_id = backbone["img_token_id"]
        self.image_token_id = backbone["image_token_id"]
        self.eos_token_id = backbone["eos_token_id"]
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        for name in ("img_token_id", "image_token_id", "eos_token_id", "vision_start_token_id"):
            if not 0 <= backbone[name] < vocab:
                raise EngineFolderError(
                    f"config.backbone.{name} is {backbone[name]}, outside the tokenizer's "
                    f"{vocab} tokens; rebuild the folder"
                )
        pad = tokenizer.encode(template["image_pad"], add_special_tokens=False).ids
        if pad != [self.image_token_id]:
            raise EngineFolderError(
                f"template.image_pad {template['image_pad']!r} is not the image token "
                f"{self.image_token_id} of this tokenizer (it encodes to {pad}); rebuild the folder"
            )

    @classmethod
    def from_folder(cls, folder: Path, manifest: dict) -> PromptEncoder:
        path = folder / manifest["host"]["tokenizer"]["file"]
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises a bare Exception
            raise EngineFolderError(
                f"{path} is not a tokenizer file ({err}); rebuild the folder"
            ) from err
        return cls(tokenizer, manifest["template"], manifest["config"]["backbone"])

    def _runs(self, trusted: str) -> list[str | int]:
        """A trusted string as text runs (str) and its special tokens (ids)."""
        if self._special_re is None:
            return [trusted]
        parts = self._special_re.split(trusted)  # text, special, text, ...
        return [self.special[p] if i % 2 else p for i, p in enumerate(parts)]

    def encode(self, rendered: str, user: str) -> list[int]:
        """Ids of a rendered template whose one `_SLOT` is replaced by `user`, as text."""
        before, after = rendered.split(_SLOT)
        head, tail = self._runs(before), self._runs(after)
        pieces = [*head[:-1], head[-1] + user + tail[0], *tail[1:]]
        ids: list[int] = []
        for piece in pieces:
            if isinstance(piece, int):
                ids.append(piece)
            elif piece:
                ids += self.literal.encode(piece, add_special_tokens=False).ids
        return ids

    def _chat(self, text: str) -> str:
        t = self.template
        return t["chat"].format(system=t["system"], text=text)

    def generation_ids(self, prompt: str, *, template: bool = True) -> np.ndarray:
        """int64 (S,) ids of a generation prompt ending in `[IMG]`."""
        if not isinstance(prompt, str):
            validate.text("prompt", prompt)
        if template:
            rendered = self._chat(self.template["generation_instruction"].format(caption=_SLOT))
            ids = self.encode(rendered, prompt)
        else:  # the manifest's own negative prompt: trusted
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return np.array([*ids, self.img_token_id], dtype=np.int64)

    def chat_ids(self, question: str, num_image_tokens: int) -> np.ndarray:
        """int64 (S,) ids of an image + question chat prompt."""
        if not isinstance(question, str):
            validate.text("question", question)
        t = self.template
        user = t["image_chat"].format(image=t["image_pad"] * num_image_tokens, question=_SLOT)
        return np.array(self.encode(self._chat(user), question), dtype=np.int64)

    def unknown_words(self, prompt: str) -> list[str]:
        """The prompt's words outside the vocabulary the model was trained on, when the folder
        records one (`template.vocabulary`: the tiny model's shapes-world words; a general
        model records none and knows every word). Such words are tokenized all the same, but
        the model has never seen them: what it draws for them is noise."""
        vocabulary = self.template.get("vocabulary")
        if not vocabulary or not isinstance(prompt, str):
            return []
        known = set(vocabulary)
        words = re.findall(r"[^\W\d_]+", prompt.lower())
        return list(dict.fromkeys(w for w in words if w not in known))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
