"""Host-side text: the tokenizer (`tokenizers`) and the prompt templates recorded in the manifest.

Generation: the caption is wrapped in the generation instruction and the chat template, encoded,
and `[IMG]` is appended (its embedding is then followed by the 64 latent queries). The decoder's
negative features use the raw blank prompt (no template). Understanding: one image's merged patch
tokens (`<|image_pad|>` repeated) between the vision markers, then the question, in the chat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


class PromptEncoder:
    def __init__(self, tokenizer: Tokenizer, template: dict, backbone: dict) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.img_token_id = backbone["img_token_id"]
        self.image_token_id = backbone["image_token_id"]
        self.eos_token_id = backbone["eos_token_id"]

    @classmethod
    def from_folder(cls, folder: Path, manifest: dict) -> PromptEncoder:
        tokenizer = Tokenizer.from_file(str(folder / manifest["host"]["tokenizer"]["file"]))
        return cls(tokenizer, manifest["template"], manifest["config"]["backbone"])

    def _chat(self, text: str) -> str:
        t = self.template
        return t["chat"].format(system=t["system"], text=text)

    def generation_ids(self, prompt: str, *, template: bool = True) -> np.ndarray:
        """int64 (S,) ids of a generation prompt ending in `[IMG]`."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        text = self._chat(self.template["generation_instruction"].format(caption=prompt))
        ids = self.tokenizer.encode(text if template else prompt, add_special_tokens=False).ids
        return np.array([*ids, self.img_token_id], dtype=np.int64)

    def chat_ids(self, question: str, num_image_tokens: int) -> np.ndarray:
        """int64 (S,) ids of an image + question chat prompt."""
        if not isinstance(question, str):
            raise TypeError(f"question must be a str, got {type(question).__name__}")
        t = self.template
        user = t["image_chat"].format(image=t["image_pad"] * num_image_tokens, question=question)
        ids = self.tokenizer.encode(self._chat(user), add_special_tokens=False).ids
        return np.array(ids, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
