"""Emu2-Gen's pixel decoder: diffusers' SDXL-layout UNet + AutoencoderKL + Euler discrete.

The UNet denoises VAE latents conditioned on the 64 target features: `encoder_hidden_states` are
the features, `text_embeds` their mean over tokens and `time_ids` (size, crop, target size) the
SDXL micro-conditioning (`tiny` adds 2-D rotary positions to the cross-attention:
`cross_attention_rope.py`). Sampling is epsilon-prediction Euler with classifier-free guidance
against cached negative features (batch order [cond, neg]); the VAE decodes `latents / scaling`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from torch import nn

from training.config import DecoderConfig
from training.model.cross_attention_rope import install_cross_attention_rope

# The decoder's samplers: diffusers' scheduler and its options over the decoder's own config.
DECODER_SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def unet_kwargs(cfg: DecoderConfig) -> dict:
    return dict(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=cfg.down_block_types,
        up_block_types=cfg.up_block_types,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        transformer_layers_per_block=cfg.transformer_layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cfg.cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=cfg.addition_time_embed_dim,
        projection_class_embeddings_input_dim=cfg.projection_class_embeddings_input_dim,
        norm_num_groups=cfg.norm_num_groups,
        use_linear_projection=True,
    )


def vae_kwargs(cfg: DecoderConfig) -> dict:
    n = len(cfg.vae_block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_block_out_channels,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_num_groups,
        sample_size=cfg.image_size,
        scaling_factor=cfg.vae_scaling_factor,
        force_upcast=False,
    )


def scheduler_kwargs(cfg: DecoderConfig) -> dict:
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        timestep_spacing=cfg.timestep_spacing,
        steps_offset=cfg.steps_offset,
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


class Decoder(nn.Module):
    """UNet + VAE + scheduler config of the pixel decoder (the `diffusion-decoder/` folder)."""

    def __init__(
        self,
        cfg: DecoderConfig,
        unet: UNet2DConditionModel | None = None,
        vae: AutoencoderKL | None = None,
        scheduler: EulerDiscreteScheduler | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.unet = unet if unet is not None else UNet2DConditionModel(**unet_kwargs(cfg))
        if cfg.cross_attention_rope:
            install_cross_attention_rope(self.unet)
        self.vae = vae if vae is not None else AutoencoderKL(**vae_kwargs(cfg))
        self.scheduler = scheduler or EulerDiscreteScheduler(**scheduler_kwargs(cfg))
        self.register_buffer(
            "time_ids", torch.tensor(cfg.time_ids, dtype=torch.float32), persistent=False
        )

    def save_folder(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet")
        self.vae.save_pretrained(folder / "vae")
        self.scheduler.save_pretrained(folder / "scheduler")
        index = {
            "_class_name": "BLIP3oDiffusionDecoder",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))

    def epsilon(
        self, latents: torch.Tensor, timestep: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        """UNet noise prediction: latents (B, 4, h, w), timestep (B,), features (B, 64, C)."""
        b = latents.shape[0]
        cond = {
            # float32 like the sinusoidal time-id embedding it is concatenated with inside the
            # UNet (torch promotes a mixed concat; ONNX needs one dtype)
            "text_embeds": features.mean(dim=1).float(),  # (B, C)
            "time_ids": self.time_ids.to(latents).expand(b, -1),  # (B, 6)
        }
        return self.unet(
            latents, timestep, encoder_hidden_states=features, added_cond_kwargs=cond
        ).sample

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode to images in [0, 1]: (B, 4, h, w) -> (B, 3, H, W)."""
        image = self.vae.decode(latents / self.config.vae_scaling_factor).sample
        return (image / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def sample(
        self,
        features: torch.Tensor,
        negative: torch.Tensor,
        noise: torch.Tensor,
        *,
        steps: int,
        guidance: float,
        sampler: str = "euler",
    ) -> torch.Tensor:
        """Denoise `noise` (B, 4, h, w) into images (B, 3, H, W) in [0, 1].

        CFG batch [cond, neg]: features (B, 64, C), negative (1, 64, C). `sampler`: "euler"
        (diffusers' EulerDiscreteScheduler, BLIP3-o's) or "dpmpp_2m" (DPMSolverMultistepScheduler,
        dpmsolver++ order 2), either built from the decoder's own scheduler config.
        """
        if sampler not in DECODER_SAMPLERS:
            valid = ", ".join(DECODER_SAMPLERS)
            raise ValueError(f"unknown decoder sampler {sampler!r}; valid: {valid}")
        kind, options = DECODER_SAMPLERS[sampler]
        scheduler = kind.from_config(self.scheduler.config, **options)
        scheduler.set_timesteps(steps)
        b = features.shape[0]
        feats = torch.cat([features, negative.to(features).expand(b, -1, -1)])  # (2B, 64, C)
        latents = noise.to(features) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            eps_cond, eps_neg = self.epsilon(model_in, t.expand(2 * b), feats).chunk(2)
            eps = eps_neg + guidance * (eps_cond - eps_neg)
            latents = scheduler.step(eps, t, latents).prev_sample
        return self.decode_latents(latents)
