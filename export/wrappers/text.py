"""Wrappers of the text-decoder graphs: `prefill` and `decode` (Qwen2.5-VL's language model).

Prefill returns the prompt's KV cache as two stacked tensors, `(L, B, KV, S, D)` keys and
values (inside `forward` transformers fills a `DynamicCache`; in transformers 5.x the kwarg is
`cache=`), which the runtime writes into its preallocated cache once. Decode reads that cache
in place, one `(B, KV, C, D)` input per layer and side, and returns only the new row. Token
embedding lookup and M-RoPE position ids stay on the host: both graphs take `inputs_embeds` and
`(3, B, S)` position ids, whose three rows (temporal, height, width) all reach the rotary embedding.

Attention is causal with no padding mask: a batch must hold prompts of equal length (padded
batches are not supported), so no mask tensor enters either graph and transformers builds the
causal mask from the (symbolic) query and cache lengths.

`logits` are those of the last position only (B, vocab): that is all greedy/sampled decoding
reads, and it keeps the prefill output small at long prompts.

Grouped-query attention runs inside SDPA (`enable_gqa=True`) rather than through transformers'
`repeat_kv` (expand + reshape of K/V). Under torch.export that reshape of the grown cache
(length `past+1`) raises a guard `Min(32(past+1), 64(past+1)) == 32(past+1)` that the shape
solver cannot prove from the `past` range, so a dynamic decode export fails; SDPA with
`enable_gqa` computes the same attention and exports with `past` symbolic. Transformers reads
the switch (`TRANSFORMERS_SDPA_FORCE_GQA`) at call time, so it is set only around our forward.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import DynamicCache


@contextmanager
def _sdpa_gqa() -> Iterator[None]:
    """Let transformers' SDPA attention pass `enable_gqa=True` instead of repeating K/V heads."""
    key, old = "TRANSFORMERS_SDPA_FORCE_GQA", os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def _sdpa_language_model(qwen) -> nn.Module:
    """The text decoder of a Qwen2.5-VL model, checked to run transformers' SDPA attention."""
    lm = qwen.model.language_model
    impl = lm.config._attn_implementation
    if impl != "sdpa":
        raise ValueError(f"text graphs export with attn_implementation 'sdpa', got {impl!r}")
    return lm


def _stack_cache(cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer (B, KV, T, D) keys/values of a cache -> stacked (L, B, KV, T, D) pair."""
    keys = torch.stack([layer.keys for layer in cache.layers])  # (L, B, KV, T, D)
    values = torch.stack([layer.values for layer in cache.layers])  # (L, B, KV, T, D)
    return keys, values


class PrefillGraph(nn.Module):
    """Causal forward of a whole prompt: hidden states, last-position logits and the KV cache.

    forward(inputs_embeds (B, S, H), position_ids (3, B, S) int64) ->
    hidden_states (B, S, H) after the final norm, logits (B, vocab) of position S-1,
    present_keys / present_values (L, B, KV, S, D).
    """

    def __init__(self, qwen) -> None:
        super().__init__()
        self.language_model = _sdpa_language_model(qwen)
        self.lm_head = qwen.lm_head

    def forward(self, inputs_embeds, position_ids):
        cache = DynamicCache(config=self.language_model.config)
        with _sdpa_gqa():
            out = self.language_model(
                inputs_embeds=inputs_embeds, position_ids=position_ids, cache=cache, use_cache=True
            )
        hidden = out.last_hidden_state  # (B, S, H)
        logits = self.lm_head(hidden[:, -1])  # (B, vocab)
        present_keys, present_values = _stack_cache(cache)  # (L, B, KV, S, D) each
        return hidden, logits, present_keys, present_values


class DecodeGraph(nn.Module):
    """One decoding step against a fixed-capacity KV cache the runtime owns and grows in place.

    forward(inputs_embeds (B, 1, H), position_ids (3, B, 1) int64, cache_position (1,) int64,
    *cache: cache_keys.0, cache_values.0, cache_keys.1, ... (B, KV, C, D) each) ->
    logits (B, vocab), new_keys / new_values (L, B, KV, 1, D).

    The cache holds `cache_position` = P valid rows (0..P-1; rows P..C-1 are ignored, whatever
    they hold); the new token is row P, which the runtime writes into its cache from
    `new_keys` / `new_values` after the step. The cache is only read, one input per layer
    (`runtime.folder.graphs.cache_names`), so no K/V tensor is sliced, concatenated or copied and
    the
    outputs are independent of the past's length: attention scores the query against the cache
    rows (masked past P) and against the new key separately, and one softmax covers both. This
    is transformers' Qwen2.5-VL decoder layer (RMSNorm, q/k/v with bias, M-RoPE, grouped-query
    attention, o_proj, SwiGLU MLP) written out around that attention;
    `tests/test_export_text.py` checks it against transformers' own forward.
    """

    def __init__(self, qwen) -> None:
        super().__init__()
        self.language_model = _sdpa_language_model(qwen)
        self.lm_head = qwen.lm_head

    def forward(self, inputs_embeds, position_ids, cache_position, *cache):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

        lm, h = self.language_model, inputs_embeds  # (B, 1, H)
        if len(cache) != 2 * len(lm.layers):
            raise ValueError(f"{len(lm.layers)} layers take {2 * len(lm.layers)} cache inputs")
        batch, kv, capacity, dim = cache[0].shape
        cos, sin = lm.rotary_emb(h, position_ids)  # (B, 1, D) each
        rows = torch.arange(capacity, device=h.device)  # (C,)
        past_mask = torch.where(rows < cache_position, 0.0, float("-inf"))  # (C,) 0 | -inf
        new_keys, new_values = [], []
        for i, layer in enumerate(lm.layers):
            attn, residual = layer.self_attn, h
            cache_keys, cache_values = cache[2 * i], cache[2 * i + 1]  # (B, KV, C, D)
            x = layer.input_layernorm(h)  # (B, 1, H)
            q = attn.q_proj(x).view(batch, 1, -1, dim).transpose(1, 2)  # (B, NH, 1, D)
            k = attn.k_proj(x).view(batch, 1, kv, dim).transpose(1, 2)  # (B, KV, 1, D)
            v = attn.v_proj(x).view(batch, 1, kv, dim).transpose(1, 2)  # (B, KV, 1, D)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            q = q.reshape(batch, kv, -1, dim)  # (B, KV, G, D): head j reads kv head j // G
            past = q @ cache_keys.transpose(-1, -2) * attn.scaling  # (B, KV, G, C)
            own = (q * k).sum(-1, keepdim=True) * attn.scaling  # (B, KV, G, 1)
            scores = torch.cat([past.float() + past_mask, own.float()], -1)  # (B, KV, G, C+1)
            probs = scores.softmax(-1).to(q.dtype)
            out = probs[..., :capacity] @ cache_values + probs[..., capacity:] * v  # (B,KV,G,D)
            h = residual + attn.o_proj(out.reshape(batch, 1, -1))  # (B, 1, H)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            new_keys.append(k)
            new_values.append(v)
        logits = self.lm_head(lm.norm(h)[:, -1])  # (B, vocab)
        return logits, torch.stack(new_keys), torch.stack(new_values)  # (L, B, KV, 1, D) each
