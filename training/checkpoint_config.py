"""A checkpoint's `config.json`: the variant it holds, checked field by field, and its writing.

Published BLIP3-o checkpoints carry a transformers Qwen2.5-VL config (4.51's flat form, or 5.x's
`text_config`) plus BLIP3-o's fields. We do not build the model from those numbers: the variant
is looked up (our `blip3o_edge` field when present, else `hidden_size`), and every backbone
number the file holds must equal the variant's, so a checkpoint of another model or another
size stops here with the field and both values named, before any weight is read.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from training.checkpoint_files import CheckpointError, read_json_object
from training.config import ModelConfig, from_dict, from_preset, reduced_depth, to_dict

CONFIG_FILE = "config.json"
MODEL_TYPES = ("blip3o_qwen", "blip3o_qwen_inference", "qwen2_5_vl")
VARIANT_BY_HIDDEN_SIZE = {128: "tiny", 2048: "4b", 3584: "8b"}


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
                hint = ""
                if key == "num_hidden_layers" and isinstance(found[key], int):
                    hint = f" (a reduced-depth checkpoint? load it with layers={found[key]})"
                raise CheckpointError(
                    f"{path}: {prefix}{key} = {found[key]!r}, but the {cfg.variant!r} variant "
                    f"has {want!r}{hint}"
                )


def read_config(folder: str | Path, *, layers: int | None = None) -> ModelConfig:
    """The `ModelConfig` of a checkpoint folder, from its `config.json`.

    The variant comes from our own `blip3o_edge` field when present (exact round trip), else from
    `hidden_size` (128 -> tiny, 2048 -> 4b, 3584 -> 8b); every backbone number in the file is
    then checked against that config. `layers` reads a published-form checkpoint written at
    `reduced_depth(variant, layers)` (real widths, fewer layers: tests and memory checks).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint folder {folder} has no {CONFIG_FILE}")
    data = read_json_object(path)
    model_type = data.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{path} has model_type {model_type!r}, not BLIP3-o; accepted: {', '.join(MODEL_TYPES)}"
        )
    if "blip3o_edge" in data:
        cfg = from_dict(data["blip3o_edge"])
        if layers is not None and layers != cfg.backbone.num_layers:
            raise CheckpointError(
                f"{path} holds {cfg.backbone.num_layers} layers, not the {layers} asked for"
            )
    else:
        hidden = _text_fields(data).get("hidden_size")
        if hidden not in VARIANT_BY_HIDDEN_SIZE:
            known = ", ".join(f"{h} ({v})" for h, v in VARIANT_BY_HIDDEN_SIZE.items())
            raise CheckpointError(
                f"{path}: unknown variant, hidden_size {hidden!r}; known: {known}"
            )
        cfg = from_preset(VARIANT_BY_HIDDEN_SIZE[hidden])
        if layers is not None:
            try:
                cfg = reduced_depth(cfg, layers)
            except ValueError as err:
                raise CheckpointError(f"{path}: {err}") from err
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
