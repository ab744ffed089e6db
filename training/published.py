"""Write a checkpoint the way BLIP3-o's release writes it, from our model (a test and dev tool).

BLIP3-o's weights cannot reach our machines, so the path a user takes first (`build_engines.py
--checkpoint DIR` on the published folder) is proven on folders written in the published form
(`docs/architecture.md`, "Checkpoint layout"), which differs from what `save_model` writes:

- bf16 tensors in shards named as transformers names them (`model-00001-of-00002.safetensors`)
  with `model.safetensors.index.json` (`metadata.total_size`, `weight_map`), transformers 4.51
  keys, no `lm_head` when the head is tied (the 3B backbone), one when it is not (7B);
- tensors the inference code ignores (`model.gen_vision_tower.*`, the training-time EVA-CLIP);
- `config.json` as transformers 4.51 writes BLIP3-o's training config: `model_type`
  `blip3o_qwen`, `rope_scaling` rewritten to type `default` with `mrope_section` kept,
  `torch_dtype` bfloat16, LLaVA-style training fields, and no field of ours;
- `diffusion-decoder/` with the weights as diffusers' `bf16` variant
  (`unet/diffusion_pytorch_model.bf16.safetensors`) and its scheduler config;
- the tokenizer as the slow tokenizer saves it: `vocab.json`, `merges.txt`,
  `tokenizer_config.json` with the added tokens, and no `tokenizer.json` (optional).

The tiny variant has no published identity beyond its `hidden_size` (128), which the loader maps
to `tiny`; a `reduced_depth` config is read back with `read_config(folder, layers=N)`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from training.checkpoint import DECODER_DIR, INDEX_FILE, TOKENIZER_FILE, published_state
from training.checkpoint_config import CONFIG_FILE, published_config
from training.checkpoint_files import DIFFUSERS_WEIGHTS
from training.config import ModelConfig
from training.model.blip3o import BLIP3o
from training.model.decoder import Decoder

log = logging.getLogger(__name__)

# A few of the EVA-CLIP tower's tensors that training checkpoints carry (inference ignores them).
IGNORED_TENSORS = {
    "model.gen_vision_tower.vision_tower.blocks.0.attn.qkv.weight": (48, 16),
    "model.gen_vision_tower.vision_tower.blocks.0.norm1.weight": (16,),
}
# Training-time fields BLIP3-o's config.json carries besides the model's (LLaVA heritage).
TRAINING_FIELDS = {
    "mm_use_im_start_end": False,
    "tokenizer_padding_side": "right",
    "tokenizer_model_max_length": 512,
    "tune_mm_mlp_adapter": False,
    "use_cache": True,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "max_window_layers": 70,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "transformers_version": "4.51.3",
}


def training_config(cfg: ModelConfig) -> dict:
    """`config.json` as transformers 4.51 saves BLIP3-o's training model of this config."""
    data = published_config(cfg, torch.bfloat16)
    del data["blip3o_edge"]
    mrope = data.pop("rope_scaling")["mrope_section"]
    return {
        **data,
        "architectures": ["blip3oQwenForCausalLM"],
        "model_type": "blip3o_qwen",
        "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": mrope},
        **TRAINING_FIELDS,
    }


def _shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Keys grouped greedily, in order, into shards of at most `max_bytes` (one key may exceed)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def write_weights(
    tensors: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype, max_shard_bytes: int
) -> dict:
    """HF-named shards + index of `tensors` cast to `dtype`; returns the index."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {k: t.numel() * (itemsize if t.is_floating_point() else t.element_size())
             for k, t in tensors.items()}  # fmt: skip
    groups = _shards(sizes, max_shard_bytes)
    weight_map = {}
    for i, keys in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        part = {}
        for k in keys:
            t = tensors[k].detach().to("cpu")
            part[k] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, name)
        del part
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def write_decoder(decoder: Decoder, folder: Path, dtype: torch.dtype, variant: str) -> None:
    """A diffusers folder (`unet/`, `vae/`, `scheduler/`) with the weights as `variant` files."""
    for name, module in (("unet", decoder.unet), ("vae", decoder.vae)):
        sub = folder / name
        sub.mkdir(parents=True)
        module.save_config(sub)
        state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
        save_file(state, sub / f"{DIFFUSERS_WEIGHTS}.{variant}.safetensors", {"format": "pt"})
        del state
    decoder.scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.32.2",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_slow_tokenizer(tokenizer, folder: Path, *, with_json: bool = False) -> None:
    """`vocab.json` + `merges.txt` + `tokenizer_config.json` (+ `tokenizer.json` if asked)."""
    tokenizer.model.save(str(folder))
    added = {
        str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": t.special}
        for i, t in sorted(tokenizer.get_added_tokens_decoder().items())
    }  # fmt: skip
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if with_json:
        tokenizer.save(str(folder / TOKENIZER_FILE))


# Qwen2.5's added tokens from id 151643 on, then BLIP3-o's three (vocabulary 151668).
QWEN_ADDED_TOKENS = (
    *("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>"),
    *("<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>"),
    *("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"),
    *("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"),
    *("<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "[IMG]", "[/IMG]", "<image>"),
)


def qwen_shaped_tokenizer(tokenizer, vocab_size: int = 151668):
    """A stand-in for Qwen2.5's tokenizer at real-width checkpoints: the tiny tokenizer's merges
    in a base vocabulary padded to Qwen's 151,643 entries, then Qwen's and BLIP3-o's added
    tokens at their published ids (`<|im_end|>` 151645, `[IMG]` 151665, ...)."""
    from tokenizers import AddedToken
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = BPE.read_file(*tokenizer.model.save(tmp))
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    base = vocab_size - len(QWEN_ADDED_TOKENS)
    vocab = {(f"<|tiny_{i}|>" if t in specials else t): i for t, i in vocab.items()}
    vocab |= {f"<|filler_{i}|>": i for i in range(len(vocab), base)}
    out = Qwen2Tokenizer(vocab=vocab, merges=merges).backend_tokenizer
    out.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_ADDED_TOKENS])
    return out


def write_published(
    model: BLIP3o,
    decoder: Decoder,
    tokenizer,
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 2 << 30,
    tokenizer_json: bool = False,
    decoder_variant: str = "bf16",
) -> Path:
    """Write `model`, `decoder` and `tokenizer` into a new folder in BLIP3-o's published form.

    At least two shards are written whenever the model is over `max_shard_bytes` (a small
    `max_shard_bytes` forces sharding of a tiny model). Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=False)
    tensors = published_state(model)
    tensors |= {k: torch.randn(s, generator=torch.Generator().manual_seed(0))
                for k, s in IGNORED_TENSORS.items()}  # fmt: skip
    index = write_weights(tensors, folder, dtype, max_shard_bytes)
    (folder / CONFIG_FILE).write_text(json.dumps(training_config(model.config), indent=2) + "\n")
    write_decoder(decoder, folder / DECODER_DIR, dtype, decoder_variant)
    write_slow_tokenizer(tokenizer, folder, with_json=tokenizer_json)
    shards = len(set(index["weight_map"].values()))
    log.info("wrote %s, published form, to %s (%d shards)", model.config.variant, folder, shards)
    return folder
