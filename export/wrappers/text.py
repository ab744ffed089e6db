"""Wrappers of the text-decoder graphs: `prefill` and `decode` (Qwen2.5-VL's language model).

The KV cache crosses the graph boundary as two plain stacked tensors, `(L, B, KV, T, D)` keys and
values, so a runtime can keep it in one buffer per side; inside `forward` it is rebuilt as the
transformers `DynamicCache` the model expects (in transformers 5.x the kwarg is `cache=`). Token
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
    """One decoding step on an explicit past: last-position logits and the grown KV cache.

    forward(inputs_embeds (B, 1, H), position_ids (3, B, 1) int64,
    past_keys / past_values (L, B, KV, P, D)) ->
    logits (B, vocab), present_keys / present_values (L, B, KV, P+1, D).
    """

    def __init__(self, qwen) -> None:
        super().__init__()
        self.language_model = _sdpa_language_model(qwen)
        self.lm_head = qwen.lm_head

    def forward(self, inputs_embeds, position_ids, past_keys, past_values):
        cache = DynamicCache(config=self.language_model.config)
        for i in range(len(self.language_model.layers)):  # static L: one cache layer per layer
            cache.update(past_keys[i], past_values[i], i)  # (B, KV, P, D) each
        with _sdpa_gqa():
            out = self.language_model(
                inputs_embeds=inputs_embeds, position_ids=position_ids, cache=cache, use_cache=True
            )
        logits = self.lm_head(out.last_hidden_state[:, -1])  # (B, vocab)
        present_keys, present_values = _stack_cache(cache)  # (L, B, KV, P+1, D) each
        return logits, present_keys, present_values
