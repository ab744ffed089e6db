"""Image understanding: vision graph -> prefill with merged image embeddings -> greedy decode.

Host side: Qwen2.5-VL preprocessing, window-ordered vision feeds, the chat prompt with one
`<|image_pad|>` per merged patch token, M-RoPE position ids (3 rows) and their decode deltas,
token embedding lookups and the argmax. The KV cache passes from `prefill` to `decode` and from
each decode step to the next as the sessions' arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from runtime import checks
from runtime.errors import UserError, UserTypeError
from runtime.image_preprocess import MAX_ASPECT_RATIO, preprocess_image
from runtime.manifest import graph_spec
from runtime.mrope import decode_position_ids, rope_index
from runtime.vision_feeds import vision_feeds

MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs before resizing
MAX_NEW_TOKENS = 1 << 16
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # grayscale PNG/TIFF of 16 bits


def load_image(image) -> Image.Image:
    """A PIL image, an (H, W, 3|4) uint8 array or a path, as an RGB image, with clear errors.

    16-bit grayscale images are scaled to 8 bits (not clipped, which would turn most of the
    range white)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.is_dir():
            raise UserError(f"{path} is a folder, not an image")
        try:
            with Image.open(path) as f:
                if f.width * f.height > MAX_IMAGE_PIXELS:
                    raise UserError(
                        f"{path} is {f.width}x{f.height} px; at most {MAX_IMAGE_PIXELS} "
                        "pixels are accepted"
                    )
                f.load()
                image = f.copy()
        except (OSError, Image.DecompressionBombError) as err:
            raise UserError(f"cannot read an image from {path}: {err}") from err
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise UserError(
                f"an image array must be (H, W, 3) or (H, W, 4) uint8, got {image.shape} "
                f"{image.dtype}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise UserTypeError(
            f"image must be a PIL image, an array or a path, got {type(image).__name__}"
        )
    if image.mode in _SIXTEEN_BIT:
        wide = np.asarray(image, dtype=np.float64)  # (H, W) in [0, 65535]
        image = Image.fromarray((np.clip(wide, 0, 65535) / 257).round().astype(np.uint8), "L")
    return image.convert("RGB")


def prepare_image(gen, image) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess an image for the vision graph: (image_embeds feeds, grid_thw)."""
    v = gen.config["backbone"]["vision"]
    image = load_image(image)
    if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
        raise UserError(
            f"image of {image.width}x{image.height} px is too elongated; the aspect ratio "
            f"must be at most {MAX_ASPECT_RATIO}"
        )
    if min(image.size) < v["patch_size"]:
        raise UserError(
            f"image of {image.width}x{image.height} px is smaller than one "
            f"{v['patch_size']}x{v['patch_size']} vision patch"
        )
    pixels, grid = preprocess_image(
        image,
        patch_size=v["patch_size"],
        temporal_patch_size=v["temporal_patch_size"],
        merge_size=v["spatial_merge_size"],
        min_pixels=v["min_pixels"],
        max_pixels=v["max_pixels"],
    )
    feeds = vision_feeds(
        pixels,
        grid,
        spatial_merge_size=v["spatial_merge_size"],
        window_size=v["window_size"],
        patch_size=v["patch_size"],
    )
    feeds["pixel_values"] = feeds["pixel_values"].astype(gen.io_dtype)
    return feeds, grid


def answer_tokens(
    gen, image, question: str, *, max_new_tokens: int, stream: Callable[[str], None] | None
) -> str:
    max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    question = checks.text("question", question)
    b = gen.config["backbone"]
    feeds, grid = prepare_image(gen, image)
    vision = gen.session("vision")
    image_embeds = vision.to_host(vision.run(feeds)["image_embeds"]).astype(np.float32)
    gen.release("vision")
    ids = gen.prompts.chat_ids(question, image_embeds.shape[0])
    limit = graph_spec(gen.manifest, "prefill").dim("seq").max
    if len(ids) > limit:
        raise UserError(f"question + image are {len(ids)} tokens; the prefill takes {limit}")
    embeds = gen.embed(ids)  # (S, H)
    embeds[ids == b["image_token_id"]] = image_embeds
    positions, deltas = rope_index(
        ids[None],
        grid,
        image_token_id=b["image_token_id"],
        vision_start_token_id=b["vision_start_token_id"],
        spatial_merge_size=b["vision"]["spatial_merge_size"],
    )
    prefill = gen.session("prefill")
    out = prefill.run(
        {"inputs_embeds": embeds[None].astype(gen.io_dtype), "position_ids": positions}
    )
    logits = prefill.to_host(out["logits"])
    keys, values = out["present_keys"], out["present_values"]
    gen.release("prefill")
    max_seq = graph_spec(gen.manifest, "decode").dim("past").max
    decode = gen.session("decode")
    tokens: list[int] = []
    text = ""
    past = len(ids)
    for _ in range(max_new_tokens):
        checks.finite("the answer's logits", logits, "check the engine folder")
        token = int(np.argmax(logits[0]))
        if token == b["eos_token_id"]:
            break
        tokens.append(token)
        if stream is not None:
            new_text = gen.prompts.decode(tokens)
            if len(new_text) > len(text):
                stream(new_text[len(text) :])
            text = new_text
        if past >= max_seq or len(tokens) == max_new_tokens:
            break
        out = decode.run(
            {
                "inputs_embeds": gen.embed(np.array([token]))[None].astype(gen.io_dtype),
                "position_ids": decode_position_ids(past, deltas, 1),
                "past_keys": keys,
                "past_values": values,
            }
        )
        logits = decode.to_host(out["logits"])
        keys, values = out["present_keys"], out["present_values"]
        past += 1
    gen.release("decode")
    return gen.prompts.decode(tokens).strip()
