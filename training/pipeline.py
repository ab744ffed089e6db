"""The PyTorch reference pipeline: ground truth for every exported graph and benchmark baseline.

`generate`: prompt -> backbone conditioning (B, 64, H) -> 30 Euler flow steps of the DiT with CFG
against zeros -> 64 feature tokens -> 50 Euler steps of the decoder UNet with CFG against cached
negative features -> VAE decode -> image. The negative follows `sampler.decoder_negative`:
"blank_prompt" runs the same steps once per pipeline on a blank raw prompt, seeded (BLIP3-o as
published); "zeros" is all-zero features (the dropped condition tiny's UNet was trained with).
`answer`: plain Qwen2.5-VL chat, greedy.

Noise follows `training.flow.host_noise`: one host generator per seed, the DiT's noise first and
the decoder's second, so the torch-free runtime reproduces a generation exactly.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from training.config import ModelConfig
from training.flow import host_noise, sample_features
from training.model.backbone import generation_ids, understanding_text
from training.model.blip3o import BLIP3o
from training.model.decoder import Decoder

log = logging.getLogger(__name__)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_guidance(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def image_processor(cfg: ModelConfig) -> Qwen2VLImageProcessorPil:
    v = cfg.backbone.vision
    return Qwen2VLImageProcessorPil(
        patch_size=v.patch_size,
        merge_size=v.spatial_merge_size,
        temporal_patch_size=v.temporal_patch_size,
        min_pixels=v.min_pixels,
        max_pixels=v.max_pixels,
    )


def load_image(image) -> Image.Image:
    """A PIL image, an (H, W, 3) uint8 array or a path, as an RGB PIL image."""
    if isinstance(image, (str, Path)):
        try:
            image = Image.open(image)
            image.load()
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read an image from {image}: {err}") from err
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        kind = type(image).__name__
        raise TypeError(f"image must be a PIL image, an array or a path, got {kind}")
    return image.convert("RGB")


class ReferencePipeline:
    """BLIP3-o generation and understanding in PyTorch (CPU or GPU, fp32 by default)."""

    def __init__(self, model: BLIP3o, decoder: Decoder, tokenizer) -> None:
        self.model = model.eval()
        self.decoder = decoder.eval()
        self.tokenizer = tokenizer
        self.config: ModelConfig = model.config
        self.processor = image_processor(self.config)
        self._negative: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.model.latent_queries.device

    @torch.no_grad()
    def conditioning(self, prompt: str, *, template: bool = True) -> torch.Tensor:
        """(1, 64, H) DiT conditioning of a prompt."""
        ids = generation_ids(self.tokenizer, prompt, self.config.backbone, template=template)
        return self.model.conditioning(torch.tensor([ids], device=self.device))

    @torch.no_grad()
    def sample_tokens(
        self,
        cond: torch.Tensor,
        noise: torch.Tensor,
        *,
        steps: int,
        guidance: float,
        sampler: str = "euler",
    ) -> torch.Tensor:
        """Flow sampling of feature tokens: cond (B, 64, H), noise (B, C, h, w) -> (B, 64, C)."""
        grid = sample_features(
            self.model.velocity,
            cond,
            noise.to(self.device),
            steps=steps,
            guidance=guidance,
            sampler=sampler,
        )
        return BLIP3o.features_to_tokens(grid)

    @torch.no_grad()
    def negative_features(self) -> torch.Tensor:
        """(1, 64, C) decoder negative, per `sampler.decoder_negative`: the blank raw prompt
        sampled once with the fixed seed, or zeros."""
        if self._negative is None:
            s = self.config.sampler
            if s.decoder_negative == "zeros":
                d = self.config.dit
                shape = (1, d.input_size**2, d.in_channels)
                self._negative = torch.zeros(shape, device=self.device)
            else:
                (noise,) = host_noise(s.negative_seed, self._feature_shape(1))
                cond = self.conditioning("", template=False)
                self._negative = self.sample_tokens(
                    cond, noise, steps=s.steps, guidance=s.guidance, sampler=s.sampler
                )
        return self._negative

    def _feature_shape(self, n: int) -> tuple[int, int, int, int]:
        d = self.config.dit
        return (n, d.in_channels, d.input_size, d.input_size)

    def _latent_shape(self, n: int) -> tuple[int, int, int, int]:
        dec = self.config.decoder
        return (n, dec.latent_channels, dec.latent_size, dec.latent_size)

    @torch.no_grad()
    def features(
        self,
        prompt: str,
        *,
        seed: int = 0,
        steps: int = 30,
        guidance: float = 3.0,
        num_images: int = 1,
    ) -> torch.Tensor:
        """Generated feature tokens (num_images, 64, C) of a prompt."""
        shapes = self._feature_shape(num_images), self._latent_shape(num_images)
        noise, _ = host_noise(seed, *shapes)
        cond = self.conditioning(prompt).expand(num_images, -1, -1)
        return self.sample_tokens(cond, noise, steps=steps, guidance=guidance)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        seed: int = 0,
        steps: int = 30,
        guidance: float = 3.0,
        decoder_steps: int = 50,
        decoder_guidance: float = 3.0,
        num_images: int = 1,
        sampler: str = "euler",
        decoder_sampler: str = "euler",
    ) -> Image.Image | list[Image.Image]:
        """Text to image. Returns one PIL image, or a list when num_images > 1. `sampler` (the
        DiT's: euler, heun) and `decoder_sampler` (euler, dpmpp_2m) as `runtime.jobs.samplers`."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        for name, value in (("steps", steps), ("decoder_steps", decoder_steps)):
            _check_positive_int(name, value)
        _check_positive_int("num_images", num_images)
        _check_guidance("guidance", guidance)
        _check_guidance("decoder_guidance", decoder_guidance)
        noise, latent_noise = host_noise(
            seed, self._feature_shape(num_images), self._latent_shape(num_images)
        )
        cond = self.conditioning(prompt).expand(num_images, -1, -1)  # (N, 64, H)
        tokens = self.sample_tokens(
            cond, noise, steps=steps, guidance=guidance, sampler=sampler
        )  # (N, 64, C)
        pixels = self.decoder.sample(
            tokens,
            self.negative_features(),
            latent_noise.to(self.device),
            steps=decoder_steps,
            guidance=decoder_guidance,
            sampler=decoder_sampler,
        )  # (N, 3, S, S) in [0, 1]
        images = [to_pil(p) for p in pixels]
        return images[0] if num_images == 1 else images

    @torch.no_grad()
    def answer(self, image, question: str, max_new_tokens: int = 32) -> str:
        """Image understanding: Qwen2.5-VL chat with greedy decoding."""
        _check_positive_int("max_new_tokens", max_new_tokens)
        image = load_image(image)
        patch = self.config.backbone.vision.patch_size
        if min(image.size) < patch:
            raise ValueError(
                f"image of {image.width}x{image.height} px is smaller than one {patch}x{patch} "
                f"vision patch; give an image at least {patch} px on each side"
            )
        try:
            vision = self.processor(images=[image], return_tensors="pt")
        except ValueError as err:
            size = f"{image.width}x{image.height}"
            raise ValueError(f"cannot preprocess a {size} image: {err}") from err
        grid = vision["image_grid_thw"]  # (1, 3)
        merge = self.config.backbone.vision.spatial_merge_size
        n_tokens = int(grid.prod()) // merge**2
        text = understanding_text(question, n_tokens)
        ids = torch.tensor([self.tokenizer.encode(text, add_special_tokens=False).ids])
        b = self.config.backbone
        out = self.model.qwen.generate(
            input_ids=ids.to(self.device),
            attention_mask=torch.ones_like(ids).to(self.device),
            pixel_values=vision["pixel_values"].to(self.device),
            image_grid_thw=grid.to(self.device),
            mm_token_type_ids=(ids == b.image_token_id).int().to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=b.eos_token_id,
            pad_token_id=b.pad_token_id,
        )
        new = out[0, ids.shape[1] :].tolist()
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB PIL image."""
    array = (pixels.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)
