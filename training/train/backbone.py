"""BLIP3-o's two stages on the backbone: understanding (stage 1), then generation (stage 2).

`understanding`: the whole tiny Qwen2.5-VL (vision tower + LM) learns the three question types in
exactly the chat layout `ReferencePipeline.answer` prompts with (`understanding_text`, the
processor's patches, `mm_token_type_ids`); the loss covers the answer tokens and the closing
`<|im_end|>` only, so greedy decoding stops where the answer does.

It also learns to read captions, as Qwen2.5-VL's text pretraining taught the real backbone to:
text rows in the generation format (`generation_ids` + the 64 latent queries, exactly what stage 2
conditions on) carry a next-token loss on the caption's tokens and a caption-reading loss, a
training-only linear head (`CaptionReader`) that recovers the caption's structure (form, the named
objects' colors and shapes, relation, count) from the mean of the query positions' last hidden
states. Without them the frozen backbone hands stage 2 a condition that separates colors ~100x
more than shapes (issue #11); the queries trained here are stage 2's starting queries.

`generation`: the backbone is frozen; the 64 latent queries and the DiT learn by flow matching
(`training.flow.flow_matching_loss`: sigma uniform over 1000 levels, 10% all-zero conditioning)
to generate the normalized target features of each training image from the conditioning of its
caption's generation prompt (`generation_ids`, BLIP3-o's format). The backbone forward is the
expensive half of a step, so each prompt's conditioning is reused for `repeats` noise draws.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.config import ModelConfig
from training.data.shapes import (
    COLORS,
    COUNT_WORDS,
    FORMS,
    RELATIONS,
    SHAPES,
    Scene,
    parse_caption,
    questions,
    sample_qa,
)
from training.flow import flow_matching_loss
from training.model.backbone import (
    generation_ids,
    generation_text,
    next_turn_text,
    understanding_text,
)
from training.model.blip3o import BLIP3o
from training.pipeline import image_processor

IGNORE = -100


class UnderstandingObjective(nn.Module):
    """Next-token cross-entropy on answer tokens (+ `<|im_end|>`) of image chats."""

    def __init__(self, model: BLIP3o) -> None:
        super().__init__()
        self.qwen = model.qwen

    def forward(self, **batch):
        labels = batch.pop("labels")  # (B, S)
        logits = self.qwen(**batch).logits[:, :-1].float()  # (B, S-1, V)
        target = labels[:, 1:]
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE)
        mask = target != IGNORE
        token_acc = ((logits.argmax(-1) == target) & mask).sum() / mask.sum()
        return loss, {"token_acc": token_acc}


class UnderstandingBatcher:
    """Scenes -> padded chat batches with labels on the answers."""

    def __init__(self, cfg: ModelConfig, tokenizer, turns: int = 1) -> None:
        if isinstance(turns, bool) or not isinstance(turns, int) or turns < 1:
            raise ValueError(f"turns must be an integer >= 1, got {turns!r}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.turns = turns
        self.processor = image_processor(cfg)
        v = cfg.backbone.vision
        side = 64 // (v.patch_size * v.spatial_merge_size)
        self.image_tokens = side * side

    def chat(self, scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
        """The (question, answer) turns of one image's chat: one `sample_qa` question, or with
        `turns` > 1 that many distinct questions of the scene in random order (a multi-turn chat
        supervises several answers per image for one pass of the vision tower)."""
        if self.turns == 1:
            return [sample_qa(scene, rng)]
        qa = questions(scene)
        order = rng.permutation(len(qa))[: self.turns]
        return [qa[i] for i in order]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, scenes: list[Scene], rng: np.random.Generator) -> dict:
        b = self.cfg.backbone
        vision = self.processor(images=[s.render() for s in scenes], return_tensors="pt")
        grid = vision["image_grid_thw"]  # (B, 3)
        merge = b.vision.spatial_merge_size
        rows, labels = [], []
        for scene, thw in zip(scenes, grid):
            row, label = [], []
            for turn, (question, answer) in enumerate(self.chat(scene, rng)):
                text = understanding_text(question, int(thw.prod()) // merge**2)
                prompt = self.encode(text if turn == 0 else next_turn_text(question))
                reply = self.encode(answer) + [b.eos_token_id]
                row += prompt + reply
                label += [IGNORE] * len(prompt) + reply
            rows.append(row)
            labels.append(label)
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), b.pad_token_id, dtype=torch.long)
        lab = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, (r, lbl) in enumerate(zip(rows, labels)):
            ids[i, : len(r)], lab[i, : len(r)], mask[i, : len(r)] = (
                torch.tensor(r), torch.tensor(lbl), 1,
            )  # fmt: skip
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": grid,
            "mm_token_type_ids": (ids == b.image_token_id).int(),
            "labels": lab,
        }


class GenerationObjective(nn.Module):
    """Flow matching of the DiT on target features, conditioned through the frozen backbone."""

    def __init__(self, model: BLIP3o, repeats: int, timesteps: str = "uniform") -> None:
        super().__init__()
        self.model = model
        self.repeats = repeats
        self.timesteps = timesteps

    def forward(self, input_ids, prompt_mask, targets, generator):
        cond = conditioning(self.model, input_ids, prompt_mask)  # (P, 64, H)
        cond = cond.repeat_interleave(self.repeats, dim=0)  # (P*r, 64, H)
        x0 = BLIP3o.tokens_to_features(targets, self.model.config.dit.input_size)  # (P*r, C, 8, 8)
        loss = flow_matching_loss(
            self.model.velocity, x0, cond, generator=generator, sampling=self.timesteps
        )
        return loss, {}


def conditioning(model: BLIP3o, input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """`BLIP3o.conditioning` of a left-padded batch of prompts: (P, 64, H).

    input_ids (P, S) left-padded, each row ending in `[IMG]`; prompt_mask (P, S) 1 on real tokens.
    Pads are masked out and positions count from each prompt's first token, so every row equals
    the unpadded single-prompt conditioning (to float rounding).
    """
    return prompt_hidden(model, input_ids, prompt_mask)[:, -model.latent_queries.shape[1] :]


def prompt_hidden(
    model: BLIP3o, input_ids: torch.Tensor, prompt_mask: torch.Tensor
) -> torch.Tensor:
    """Last hidden states (after the norm) of left-padded prompts + the 64 queries: (P, S+64, H)."""
    lm = model.qwen.model.language_model
    p = input_ids.shape[0]
    queries = model.latent_queries.expand(p, -1, -1)  # (P, 64, H)
    embeds = torch.cat([lm.embed_tokens(input_ids), queries.to(lm.embed_tokens.weight)], 1)
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(p, queries.shape[1])], 1)  # (P, S+64)
    positions = (mask.cumsum(1) - 1).clamp_min(0)[None].expand(3, -1, -1)  # (3, P, S+64)
    return lm(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
    ).last_hidden_state


def generation_prompt_batch(tokenizer, cfg: ModelConfig, captions: list[str]) -> dict:
    """Left-padded generation prompt ids (each ending in `[IMG]`) and their mask."""
    rows = [generation_ids(tokenizer, c, cfg.backbone) for c in captions]
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), cfg.backbone.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r) :], mask[i, longest - len(r) :] = torch.tensor(r), 1
    return {"input_ids": ids, "prompt_mask": mask}


# ---------------------------------------------------------------- caption reading (stage 1)

# The caption structure the reader recovers: slot -> its classes (None: the slot is absent).
READER_SLOTS = {
    "form": FORMS,
    "color1": (*COLORS, None),
    "shape1": SHAPES,
    "color2": (*COLORS, None),
    "shape2": (*SHAPES, None),
    "relation": (*RELATIONS, None),
    "count": COUNT_WORDS,
}


def caption_labels(caption: str) -> list[int]:
    """The class index of each READER_SLOTS slot for one grammar caption."""
    spec = parse_caption(caption)
    first = spec["objects"][0]
    second = spec["objects"][1] if len(spec["objects"]) > 1 else (None, None)
    values = {
        "form": spec["form"], "color1": first[0], "shape1": first[1], "color2": second[0],
        "shape2": second[1], "relation": spec["relation"], "count": COUNT_WORDS[spec["count"]],
    }  # fmt: skip
    return [READER_SLOTS[slot].index(values[slot]) for slot in READER_SLOTS]


class CaptionReader(nn.Module):
    """Training-only: the caption's structure from the mean query condition (one linear map),
    and the latent queries it trains with the backbone (saved with stage 1)."""

    def __init__(self, model: BLIP3o) -> None:
        super().__init__()
        self.queries = model.latent_queries  # shared with the model
        hidden = model.config.backbone.hidden_size
        self.head = nn.Linear(hidden, sum(len(v) for v in READER_SLOTS.values()))

    def forward(self, mean_condition: torch.Tensor) -> list[torch.Tensor]:
        """(B, H) -> one (B, classes) logits tensor per slot."""
        sizes = [len(v) for v in READER_SLOTS.values()]
        return list(self.head(mean_condition).split(sizes, dim=-1))


def caption_token_mask(tokenizer, caption: str, cfg) -> list[bool]:
    """Which ids of `generation_ids(caption)` are the caption's own tokens (by character span)."""
    text = generation_text(caption)
    start = text.rindex(caption)
    end = start + len(caption)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    mask = [a < end and b > start for a, b in encoding.offsets]
    return mask + [False]  # the appended [IMG]


def caption_batch(tokenizer, cfg: ModelConfig, captions: list[str]) -> dict:
    """Left-padded generation prompts of `captions` with caption-token labels and reader labels."""
    prompts = generation_prompt_batch(tokenizer, cfg, captions)
    ids = prompts["input_ids"]
    labels = torch.full_like(ids, IGNORE)
    for i, caption in enumerate(captions):
        mask = torch.tensor(caption_token_mask(tokenizer, caption, cfg))
        row = labels[i, ids.shape[1] - len(mask) :]
        row[mask] = ids[i, ids.shape[1] - len(mask) :][mask]
    reader = torch.tensor([caption_labels(c) for c in captions], dtype=torch.long)  # (B, slots)
    return {"caption_ids": ids, "caption_mask": prompts["prompt_mask"], "caption_labels": labels,
            "reader_labels": reader}  # fmt: skip


class Stage1Objective(nn.Module):
    """Image chats (answers) + caption rows (next-token on the caption, structure from queries)."""

    def __init__(self, model: BLIP3o, lm_weight: float, read_weight: float) -> None:
        super().__init__()
        self.understanding = UnderstandingObjective(model)
        self.model = model
        self.reader = CaptionReader(model)
        self.lm_weight, self.read_weight = lm_weight, read_weight

    def forward(self, caption_ids=None, caption_mask=None, caption_labels=None,
                reader_labels=None, **chats):  # fmt: skip
        loss, metrics = self.understanding(**chats)
        if caption_ids is None:  # no caption rows (caption_rows = 0)
            return loss, metrics
        hidden = prompt_hidden(self.model, caption_ids, caption_mask)  # (P, S+64, H)
        n_query = self.model.latent_queries.shape[1]
        logits = self.model.qwen.lm_head(hidden[:, : -n_query - 1]).float()  # predicts 1..S-1
        lm = nn.functional.cross_entropy(
            logits.transpose(1, 2), caption_labels[:, 1:], ignore_index=IGNORE
        )
        read_logits = self.reader(hidden[:, -n_query:].mean(1))
        read = sum(
            nn.functional.cross_entropy(lg.float(), reader_labels[:, i])
            for i, lg in enumerate(read_logits)
        ) / len(read_logits)
        hits = torch.stack(
            [lg.argmax(-1) == reader_labels[:, i] for i, lg in enumerate(read_logits)]
        ).all(0)
        total = loss + self.lm_weight * lm + self.read_weight * read
        return total, {**metrics, "caption_lm": lm, "read": read, "read_acc": hits.float().mean()}
