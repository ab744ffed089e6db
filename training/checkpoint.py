"""Load and save BLIP3-o checkpoints in the published layout (`BLIP3o/BLIP3o-Model-4B` / `-8B`).

A checkpoint folder holds a transformers Qwen2.5-VL `config.json` with BLIP3-o's extra fields,
safetensors weights (one `model.safetensors` or shards + `model.safetensors.index.json`) named as
transformers 4.51 wrote them, the tokenizer, and the `diffusion-decoder/` diffusers folder. The
key map between published names and our parameter names is a pair of pure functions; transformers
5.x names load too. Loading builds the model with its parameters on the `meta` device and streams
tensors shard by shard into place, so an 8b checkpoint never needs two copies in memory; all keys
and shapes are checked from the safetensors headers before any tensor is read. Saving stages the
whole folder next to the target and renames it into place, so an interrupted save leaves nothing
half-written. `checkpoint_hash` is the content key the exporter caches on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file

from training.config import PRESETS, BackboneConfig, ModelConfig, from_dict, from_preset, to_dict
from training.model.blip3o import BLIP3o
from training.model.decoder import Decoder
from training.pipeline import ReferencePipeline
from training.tokenizer import check_special_tokens, load_tokenizer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
DECODER_DIR = "diffusion-decoder"
MODEL_TYPES = ("blip3o_qwen", "blip3o_qwen_inference", "qwen2_5_vl")
VARIANT_BY_HIDDEN_SIZE = {2048: "4b", 3584: "8b"}
LM_HEAD = "qwen.lm_head.weight"
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


class CheckpointError(ValueError):
    """A checkpoint folder does not match the model it should hold."""


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


# ---------------------------------------------------------------- config.json


def _text_fields(data: dict) -> dict:
    """Text-decoder fields: top level (transformers 4.51) overlaid by `text_config` (5.x)."""
    text = {**data, **(data.get("text_config") or {})}
    rope = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
    if "rope_theta" in rope:
        text.setdefault("rope_theta", rope["rope_theta"])
    if "mrope_section" in rope:
        text["mrope_section"] = rope["mrope_section"]
    return text


# config.json field -> BackboneConfig attribute where the names differ.
_RENAMED = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}
_RENAMED["num_key_value_heads"] = "num_kv_heads"
_REQUIRED_TEXT = ("hidden_size", *_RENAMED, "intermediate_size", "vocab_size")
_TEXT_FIELDS = _REQUIRED_TEXT + (
    *("rms_norm_eps", "rope_theta", "mrope_section", "tie_word_embeddings", "image_token_id"),
    *("video_token_id", "vision_start_token_id", "vision_end_token_id"),
)
_VISION_FIELDS = (  # same names in vision_config and VisionConfig
    *("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size"),
    *("spatial_merge_size", "temporal_patch_size", "window_size", "fullatt_block_indexes"),
    "tokens_per_second",
)


def _expected_fields(cfg: ModelConfig) -> tuple[dict, dict, dict]:
    """config.json values the model needs: (text fields, vision_config fields, BLIP3-o fields)."""
    b = cfg.backbone
    text = {k: _json(getattr(b, _RENAMED.get(k, k))) for k in _TEXT_FIELDS}
    vision = {k: _json(getattr(b.vision, k)) for k in _VISION_FIELDS}
    vision["spatial_patch_size"] = b.vision.patch_size  # Qwen's alias of patch_size
    extra = dict(gen_hidden_size=cfg.dit.in_channels, n_query=b.n_query)
    return text, vision, {**extra, "gen_pooling": cfg.target_encoder.pooling}


def _json(value):
    return list(value) if isinstance(value, tuple) else value


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    return list(a) == list(b) if isinstance(a, (list, tuple)) else a == b


def _check_fields(path: Path, data: dict, cfg: ModelConfig) -> None:
    """Every backbone number present in config.json must equal the config's."""
    text, vision, extra = _expected_fields(cfg)
    found_text = _text_fields(data)
    groups = (("", found_text, text), ("vision_config.", data.get("vision_config") or {}, vision))
    for prefix, found, expected in (*groups, ("", data, extra)):
        for key, want in expected.items():
            if key not in found:
                if prefix == "" and key in _REQUIRED_TEXT:
                    raise CheckpointError(f"{path} has no {key!r}")
                continue
            if not _same(found[key], want):
                raise CheckpointError(
                    f"{path}: {prefix}{key} = {found[key]!r}, but the {cfg.variant!r} variant "
                    f"has {want!r}"
                )


def read_config(folder: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint folder, from its `config.json`.

    The variant comes from our own `blip3o_edge` field when present (exact round trip, needed for
    `tiny`), else from `hidden_size` (2048 -> 4b, 3584 -> 8b); every backbone number in the file
    is then checked against that config.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint folder {folder} has no {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    model_type = data.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{path} has model_type {model_type!r}, not BLIP3-o; accepted: {', '.join(MODEL_TYPES)}"
        )
    if "blip3o_edge" in data:
        cfg = from_dict(data["blip3o_edge"])
    else:
        hidden = _text_fields(data).get("hidden_size")
        if hidden not in VARIANT_BY_HIDDEN_SIZE:
            known = ", ".join(f"{h} ({v})" for h, v in VARIANT_BY_HIDDEN_SIZE.items())
            raise CheckpointError(
                f"{path}: unknown variant, hidden_size {hidden!r}; known: {known}"
            )
        cfg = from_preset(VARIANT_BY_HIDDEN_SIZE[hidden])
    _check_fields(path, data, cfg)
    return cfg


def published_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json in the published (transformers 4.51) form plus our full config."""
    text, vision, extra = _expected_fields(cfg)
    b = cfg.backbone
    text.pop("mrope_section")
    return {
        "architectures": ["blip3oQwenForInferenceLM"],
        "model_type": "blip3o_qwen_inference",
        "hidden_act": "silu",
        **text,
        "max_position_embeddings": b.max_position_embeddings,
        "rope_scaling": {"type": "mrope", "mrope_section": list(b.mrope_section)},
        "bos_token_id": b.bos_token_id,
        "eos_token_id": b.eos_token_id,
        "pad_token_id": b.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "vision_config": {"hidden_act": "silu", "in_chans": 3, **vision},
        "gen_vision_tower": cfg.target_encoder.name,
        **extra,
        "blip3o_edge": to_dict(cfg),
    }


# ---------------------------------------------------------------- loading


def empty_model(cfg: ModelConfig) -> BLIP3o:
    """A `BLIP3o` whose parameters live on `meta` (shapes only, no memory).

    Non-persistent buffers (the DiT's RoPE tables, the rotary inv_freq), which no checkpoint
    holds, are computed on the CPU as at construction. The tied lm_head comes out untied;
    `load_model` ties it again.
    """
    with init_empty_weights(include_buffers=False):
        return BLIP3o(cfg)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) missing from {folder}: {missing}")
        return [folder / n for n in names]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise FileNotFoundError(
        f"checkpoint folder {folder} has neither {INDEX_FILE} nor {SINGLE_FILE}"
    )


def read_shapes(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Published key -> (file, shape), from the safetensors headers only."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key in found:
                    raise CheckpointError(f"tensor {key!r} is in both {found[key][0]} and {path}")
                found[key] = (path, tuple(f.get_slice(key).get_shape()))
    return found


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


def load_model(
    folder: str | Path,
    *,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> BLIP3o:
    """Load `BLIP3o` (backbone, latent queries, DiT) from a published-layout checkpoint folder.

    Tensors are streamed one at a time from the safetensors files into a `meta`-built model and
    cast to `dtype` on `device`; buffers stay float32. `variant`, when given, must be the
    checkpoint's. Raises `CheckpointError` on missing, unexpected or misshaped tensors.
    """
    folder = Path(folder)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if variant is not None and variant not in PRESETS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(PRESETS)}")
    cfg = read_config(folder)
    if variant is not None and variant != cfg.variant:
        raise CheckpointError(f"{folder} holds the {cfg.variant!r} variant, not {variant!r}")
    model = empty_model(cfg)
    found = read_shapes(weight_files(folder))
    expected = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    tied = cfg.backbone.tie_word_embeddings
    plan = plan_load(expected, {k: shape for k, (_, shape) in found.items()}, tied=tied)
    for path in sorted({found[k][0] for k in plan}):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key in plan:
                    tensor = f.get_tensor(key)
                    cast = dtype if tensor.is_floating_point() else None
                    _assign(model, plan[key], tensor.to(device=device, dtype=cast))
        log.debug("loaded %s", path.name)
    if tied:
        model.qwen.lm_head.weight = model.qwen.model.language_model.embed_tokens.weight
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:
        raise CheckpointError(f"not loaded from {folder} (still on meta): {on_meta}")
    log.info("loaded BLIP3-o %s from %s (%d tensors)", cfg.variant, folder, len(plan))
    return model.eval()


def load_pipeline(
    folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ReferencePipeline:
    """`ReferencePipeline` of a checkpoint folder: model, tokenizer and diffusion decoder."""
    folder = Path(folder)
    model = load_model(folder, dtype=dtype, device=device)
    tokenizer = load_tokenizer(folder)
    check_special_tokens(tokenizer, special_tokens(model.config.backbone))
    decoder = Decoder.from_folder(model.config.decoder, folder / DECODER_DIR)
    return ReferencePipeline(model, decoder.to(device=device, dtype=dtype), tokenizer)


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
