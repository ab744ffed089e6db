"""Load and save BLIP3-o checkpoints in the published layout (`BLIP3o/BLIP3o-Model-4B` / `-8B`).

A checkpoint folder holds a transformers Qwen2.5-VL `config.json` with BLIP3-o's extra fields,
safetensors weights (one `model.safetensors` or shards + `model.safetensors.index.json`) named as
transformers 4.51 wrote them, the tokenizer (`tokenizer.json`, or `vocab.json` + `merges.txt`),
and the `diffusion-decoder/` diffusers folder (plain or bf16-variant weights:
`decoder_folder.py`). The key map between published names and our parameter names is a pair of
pure functions; transformers 5.x names load too. Loading builds the model with its parameters on
the `meta` device and streams tensors shard by shard into place, so an 8b checkpoint never needs
two copies in memory, and `parts` loads only some components (an export of the DiT reads no
backbone tensor). `verify_checkpoint` checks keys, shapes and every file's header and size
before any tensor is read (`checkpoint_files.py`). Saving stages the whole folder next to the
target and renames it into place, so an interrupted save leaves nothing half-written.
`checkpoint_hash` is the content key the exporter caches on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from training.checkpoint_config import CONFIG_FILE, published_config, read_config
from training.checkpoint_files import (
    INDEX_FILE,
    SINGLE_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    check_tokenizer_files,
    diffusers_weights,
    read_weights,
)
from training.config import PRESETS, BackboneConfig, ModelConfig
from training.decoder_folder import DECODER_PARTS, load_decoder, settle_scheduler
from training.model.blip3o import BLIP3o
from training.model.decoder import Decoder
from training.pipeline import ReferencePipeline
from training.tokenizer import check_special_tokens, load_tokenizer

log = logging.getLogger(__name__)

# re-exported: the names callers used when they lived here
__all__ = ["CONFIG_FILE", "CheckpointError", "INDEX_FILE", "SINGLE_FILE", "TOKENIZER_FILE"]
__all__ += ["published_config", "read_config"]

DECODER_DIR = "diffusion-decoder"
LM_HEAD = "qwen.lm_head.weight"
EMBED_TOKENS = "qwen.model.language_model.embed_tokens."
# Training-only towers some published checkpoints carry; inference ignores them.
IGNORED_PREFIXES = ("model.gen_vision_tower.", "model.vae.")

# Published prefix -> our prefix, most specific first (transformers 4.51 and 5.x names).
_TO_OURS = (
    ("model.dit.model.", "dit."),
    ("model.latent_queries", "latent_queries"),
    ("model.language_model.", "qwen.model.language_model."),  # transformers 5.x
    ("model.visual.", "qwen.model.visual."),  # transformers 5.x
    ("model.embed_tokens.", "qwen.model.language_model.embed_tokens."),
    ("model.layers.", "qwen.model.language_model.layers."),
    ("model.norm.", "qwen.model.language_model.norm."),
    ("visual.", "qwen.model.visual."),
    ("lm_head.", "qwen.lm_head."),
)
# Our prefix -> published (transformers 4.51) prefix, as save_model writes it.
_TO_PUBLISHED = (
    ("dit.", "model.dit.model."),
    ("latent_queries", "model.latent_queries"),
    ("qwen.model.language_model.", "model."),
    ("qwen.model.visual.", "visual."),
    ("qwen.lm_head.", "lm_head."),
)


def _swap_prefix(name: str, table: tuple[tuple[str, str], ...], what: str) -> str:
    for src, dst in table:
        if name == src or (src.endswith(".") and name.startswith(src)):
            return dst + name[len(src) :]
    allowed = ", ".join(src + ("*" if src.endswith(".") else "") for src, _ in table)
    raise CheckpointError(f"unknown {what} {name!r}; expected one of: {allowed}")


def published_to_ours(key: str) -> str | None:
    """Our parameter name of a published tensor key; None for keys inference ignores."""
    if key.startswith(IGNORED_PREFIXES):
        return None
    return _swap_prefix(key, _TO_OURS, "checkpoint key")


def ours_to_published(name: str) -> str:
    """The published (transformers 4.51) key of one of our parameter names."""
    return _swap_prefix(name, _TO_PUBLISHED, "BLIP3o parameter name")


# ---------------------------------------------------------------- loading


def empty_model(cfg: ModelConfig) -> BLIP3o:
    """A `BLIP3o` whose parameters live on `meta` (shapes only, no memory).

    Non-persistent buffers (the DiT's RoPE tables, the rotary inv_freq), which no checkpoint
    holds, are computed on the CPU as at construction. The tied lm_head comes out untied;
    `load_model` ties it again.
    """
    with init_empty_weights(include_buffers=False):
        return BLIP3o(cfg)


def plan_load(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], *, tied: bool
) -> dict[str, str]:
    """Match published tensors to our parameters: published key -> our name.

    expected: our parameter name -> shape; found: published key -> shape. Raises naming every
    unexpected key, misshaped key (with both shapes) or missing key. With tied embeddings the
    lm_head needs no tensor of its own (one in the file is ignored).
    """
    plan, unexpected, misshaped, ignored = {}, [], [], []
    for key, shape in found.items():
        try:
            name = published_to_ours(key)
        except CheckpointError:
            name = ""
        if name is None or (tied and name == LM_HEAD):
            ignored.append(key)
        elif name not in expected:
            unexpected.append(key)
        elif tuple(shape) != tuple(expected[name]):
            misshaped.append(f"{key}: checkpoint {tuple(shape)}, model {tuple(expected[name])}")
        else:
            plan[key] = name
    if ignored:
        log.debug(
            "ignoring %d checkpoint tensor(s) inference does not use: %s", len(ignored), ignored
        )
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in the checkpoint: {unexpected}")
    if misshaped:
        raise CheckpointError(f"misshaped tensor(s): {'; '.join(misshaped)}")
    missing = sorted(set(expected) - set(plan.values()) - ({LM_HEAD} if tied else set()))
    if missing:
        keys = [ours_to_published(n) for n in missing]
        more = f" (and {len(keys) - 10} more)" if len(keys) > 10 else ""
        raise CheckpointError(f"missing tensor(s) in the checkpoint: {keys[:10]}{more}")
    return plan


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = tensor


def _selected(plan: dict[str, str], parts, tied: bool) -> dict[str, str]:
    """The part of a load plan under the given prefixes of our names (all of it for None)."""
    if parts is None:
        return plan
    prefixes = tuple(parts)
    if tied and any(LM_HEAD.startswith(p) for p in prefixes):  # the tied head is the embedding
        prefixes += (EMBED_TOKENS,)
    return {k: n for k, n in plan.items() if n.startswith(prefixes)}


def load_model(
    folder: str | Path,
    *,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: ModelConfig | None = None,
    parts: tuple[str, ...] | None = None,
) -> BLIP3o:
    """Load `BLIP3o` (backbone, latent queries, DiT) from a published-layout checkpoint folder.

    Tensors are streamed one at a time from the safetensors files into a `meta`-built model and
    cast to `dtype` on `device`; buffers stay float32. `variant`, when given, must be the
    checkpoint's; `config` is the checkpoint's config when already read (`read_config`).
    `parts`: prefixes of our parameter names to load (`("dit.",)`), the rest stays on `meta`.
    Raises `CheckpointError` on missing, unexpected or misshaped tensors and damaged files.
    """
    folder = Path(folder)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if variant is not None and variant not in PRESETS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(PRESETS)}")
    cfg = config or read_config(folder)
    if variant is not None and variant != cfg.variant:
        raise CheckpointError(f"{folder} holds the {cfg.variant!r} variant, not {variant!r}")
    model = empty_model(cfg)
    found = read_weights(folder)
    expected = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    tied = cfg.backbone.tie_word_embeddings
    plan = plan_load(expected, {k: info.shape for k, info in found.items()}, tied=tied)
    plan = _selected(plan, parts, tied)
    for path in sorted({found[k].file for k in plan}):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if key in plan:
                        tensor = f.get_tensor(key)
                        cast = dtype if tensor.is_floating_point() else None
                        _assign(model, plan[key], tensor.to(device=device, dtype=cast))
        except SafetensorError as err:
            raise CheckpointError(f"cannot read {path}: {err}") from err
        log.debug("loaded %s", path.name)
    if tied and EMBED_TOKENS + "weight" in plan.values():
        model.qwen.lm_head.weight = model.qwen.model.language_model.embed_tokens.weight
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    tensors = (*model.named_parameters(remove_duplicate=False), *model.named_buffers())
    wanted = tuple(parts) if parts is not None else ("",)
    on_meta = [n for n, t in tensors if t.is_meta and n.startswith(wanted)]
    if on_meta:
        raise CheckpointError(f"not loaded from {folder} (still on meta): {on_meta}")
    what = "" if parts is None else f" (parts {', '.join(parts)})"
    log.info("loaded BLIP3-o %s%s from %s (%d tensors)", cfg.variant, what, folder, len(plan))
    return model.eval()


def verify_checkpoint(folder: str | Path, cfg: ModelConfig) -> None:
    """Check a checkpoint folder for `cfg` without reading a tensor: one `CheckpointError` if not.

    Every safetensors header and file size (`checkpoint_files`), the index's shards and sizes,
    the key set and shapes against the model, the decoder's weight files and its scheduler
    config (run `settle_scheduler` for that), and the tokenizer's files.
    """
    folder = Path(folder)
    found = read_weights(folder)
    expected = {n: tuple(t.shape) for n, t in empty_model(cfg).state_dict(keep_vars=True).items()}
    shapes = {k: info.shape for k, info in found.items()}
    plan_load(expected, shapes, tied=cfg.backbone.tie_word_embeddings)
    decoder = folder / DECODER_DIR
    if not decoder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} has no {DECODER_DIR}/ folder")
    for part in DECODER_PARTS:
        diffusers_weights(decoder / part)
    check_tokenizer_files(folder)


def load_pipeline(
    folder: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: ModelConfig | None = None,
    scheduler: str = "check",
) -> ReferencePipeline:
    """`ReferencePipeline` of a checkpoint folder: model, tokenizer and diffusion decoder.

    `scheduler`: how the decoder's scheduler config meets the preset (`settle_scheduler`).
    """
    folder = Path(folder)
    cfg = settle_scheduler(folder / DECODER_DIR, config or read_config(folder), scheduler)
    model = load_model(folder, dtype=dtype, device=device, config=cfg)
    tokenizer = load_checked_tokenizer(folder, cfg)
    decoder = load_decoder(cfg.decoder, folder / DECODER_DIR, dtype=dtype, device=device)
    return ReferencePipeline(model, decoder, tokenizer)


def load_checked_tokenizer(folder: str | Path, cfg: ModelConfig):
    """The checkpoint's tokenizer, its special tokens checked against the config's ids."""
    tokenizer = load_tokenizer(folder)
    try:
        check_special_tokens(tokenizer, special_tokens(cfg.backbone))
    except ValueError as err:
        raise CheckpointError(f"{folder}: {err}") from err
    return tokenizer


def special_tokens(b: BackboneConfig) -> dict[str, int]:
    """Token -> id the config relies on; the tokenizer must agree."""
    return {
        "[IMG]": b.img_token_id,
        "<|image_pad|>": b.image_token_id,
        "<|video_pad|>": b.video_token_id,
        "<|vision_start|>": b.vision_start_token_id,
        "<|vision_end|>": b.vision_end_token_id,
        "<|im_end|>": b.eos_token_id,
        "<|endoftext|>": b.pad_token_id,
    }


# ---------------------------------------------------------------- saving


def published_state(model: BLIP3o) -> dict[str, torch.Tensor]:
    """The model's tensors under published keys, tied lm_head omitted."""
    tied = model.config.backbone.tie_word_embeddings
    return {
        ours_to_published(name): t
        for name, t in model.state_dict().items()
        if not (tied and name == LM_HEAD)
    }


@contextlib.contextmanager
def _staged_folder(folder: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `folder`, on error it vanishes."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"cannot save a checkpoint over the file {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staging = folder.with_name(f".{folder.name}.saving-{tag}")
    staging.mkdir()
    try:
        yield staging
        old = folder.with_name(f".{folder.name}.replaced-{tag}")
        if folder.exists():
            folder.rename(old)
        try:
            staging.rename(folder)
        except BaseException:
            if old.exists():
                old.rename(folder)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_model(
    model: BLIP3o,
    folder: str | Path,
    *,
    tokenizer=None,
    decoder: Decoder | None = None,
    max_shard_size: int | str = "2GB",
) -> Path:
    """Write `model` (and optionally the tokenizer and `Decoder`) as a published-layout folder.

    Shards of at most `max_shard_size` (transformers' sizes: "2GB", "500MB" or bytes) plus an
    index, or one `model.safetensors`. The folder is written beside its final path and renamed
    into place, so an existing checkpoint is only replaced by a complete one. Returns the folder.
    """
    folder = Path(folder)
    on_meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if on_meta:
        raise ValueError(f"cannot save parameters still on meta: {on_meta[:5]}")
    tensors = published_state(model)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    with _staged_folder(folder) as staging:
        config = published_config(model.config, model.latent_queries.dtype)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for name, keys in split.filename_to_tensors.items():
            part = {k: tensors[k].detach().to("cpu").contiguous() for k in keys}
            save_file(part, staging / name, metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(str(staging / TOKENIZER_FILE))
        if decoder is not None:
            decoder.save_folder(staging / DECODER_DIR)
    shards = len(split.filename_to_tensors)
    log.info("saved BLIP3-o %s to %s (%d shard(s))", model.config.variant, folder, shards)
    return folder


# ---------------------------------------------------------------- hashing


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_hash(folder: str | Path) -> str:
    """Content hash of a checkpoint folder: sha256 of the sorted (relative path, sha256) list."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for rel in files:
        digest.update(f"{rel}\0{file_sha256(folder / rel)}\n".encode())
    return digest.hexdigest()
