"""The frozen Qwen2.5-VL backbone (transformers' own model) and BLIP3-o's generation input.

Generation: the caption is wrapped in BLIP3-o's instruction and the Qwen ChatML template, `[IMG]`
is appended to the token ids, and the 64 learnable latent queries are appended to the token
embeddings; one causal forward with plain 1-D positions (replicated on the 3 M-RoPE axes) gives
the last hidden states after the final norm, of which the 64 query positions are the DiT's
conditioning (B, 64, H).
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from training.config import (
    CHAT_TEMPLATE,
    GENERATION_INSTRUCTION,
    IMAGE_CHAT_TEXT,
    IMAGE_PAD,
    SYSTEM_PROMPT,
    BackboneConfig,
)


def qwen_config(cfg: BackboneConfig) -> Qwen2_5_VLConfig:
    """The transformers config of the backbone (vocabulary already resized for BLIP3-o)."""
    v = cfg.vision
    return Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_parameters=dict(
                rope_type="default",
                rope_theta=cfg.rope_theta,
                mrope_section=list(cfg.mrope_section),
            ),
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.pad_token_id,
            tie_word_embeddings=cfg.tie_word_embeddings,
        ),
        vision_config=dict(
            depth=v.depth,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_heads=v.num_heads,
            out_hidden_size=v.out_hidden_size,
            patch_size=v.patch_size,
            spatial_merge_size=v.spatial_merge_size,
            temporal_patch_size=v.temporal_patch_size,
            window_size=v.window_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes),
            tokens_per_second=v.tokens_per_second,
        ),
        image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
        vision_end_token_id=cfg.vision_end_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )


def build_qwen(cfg: BackboneConfig) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialized backbone (use the `meta` device context for a shape-only one)."""
    model = Qwen2_5_VLForConditionalGeneration(qwen_config(cfg))
    return model.eval()


def generation_text(caption: str) -> str:
    """The templated generation prompt for a caption (the `[IMG]` id is appended after encoding)."""
    if not isinstance(caption, str):
        raise TypeError(f"prompt must be a str, got {type(caption).__name__}")
    text = GENERATION_INSTRUCTION.format(caption=caption)
    return CHAT_TEMPLATE.format(system=SYSTEM_PROMPT, text=text)


def understanding_text(question: str, num_image_tokens: int) -> str:
    """The templated chat prompt for one image (its merged patch tokens) and a question."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    user = IMAGE_CHAT_TEXT.format(image=IMAGE_PAD * num_image_tokens, question=question)
    return CHAT_TEMPLATE.format(system=SYSTEM_PROMPT, text=user)


def next_turn_text(question: str) -> str:
    """A further user turn after an answer (whose reply ended in `<|im_end|>`), as Qwen's chat
    template lays out multi-turn chats: the newline, the user turn, the assistant header."""
    return f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def generation_ids(tokenizer, caption: str, cfg: BackboneConfig, *, template: bool = True):
    """Token ids of a generation prompt followed by `[IMG]`: list[int].

    `template=False` encodes the raw text (BLIP3-o's blank negative prompt is raw "").
    """
    text = generation_text(caption) if template else caption
    return tokenizer.encode(text, add_special_tokens=False).ids + [cfg.img_token_id]


def text_positions(batch: int, length: int, device=None) -> torch.Tensor:
    """Plain 1-D positions replicated on the 3 M-RoPE axes: (3, B, S) int64."""
    pos = torch.arange(length, device=device)
    return pos.view(1, 1, -1).expand(3, batch, length)


def query_conditioning(
    qwen: Qwen2_5_VLForConditionalGeneration,
    latent_queries: torch.Tensor,
    input_ids: torch.Tensor,
) -> torch.Tensor:
    """The DiT's conditioning: last hidden states (after norm) at the query positions.

    input_ids (B, S) already ending in `[IMG]`; latent_queries (1, Q, H). Returns (B, Q, H).
    """
    lm = qwen.model.language_model
    embeds = lm.embed_tokens(input_ids)  # (B, S, H)
    queries = latent_queries.to(embeds.dtype).expand(input_ids.shape[0], -1, -1)  # (B, Q, H)
    embeds = torch.cat([embeds, queries], dim=1)  # (B, S+Q, H)
    positions = text_positions(embeds.shape[0], embeds.shape[1], embeds.device)
    hidden = lm(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
    return hidden[:, -latent_queries.shape[1] :]  # (B, Q, H)
