"""Wrappers of the generation graphs: `dit`, `dit_step`, `unet`, `unet_step`, `vae_decoder`.

The fused step graphs carry the whole sampler step (CFG batch, guidance combine and the scheduler
update) so that a GPU loop never leaves the device: the host only feeds the step's scalars.
Forward argument names equal the spec's input names.
"""

from __future__ import annotations

import torch
from torch import nn

from training.model.decoder import Decoder
from training.model.dit import NextDiTCrossAttn


class DiTGraph(nn.Module):
    """velocity = dit(x, timestep, z_latents) on the CFG batch."""

    def __init__(self, dit: NextDiTCrossAttn) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x, timestep, z_latents):
        return self.dit(x, timestep, z_latents)


class DiTStepGraph(nn.Module):
    """One guided flow Euler step: batch [zeros, cond], v = u + g (c - u), x += (s' - s) v."""

    def __init__(self, dit: NextDiTCrossAttn) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, latents, timestep, sigma, sigma_next, cond, guidance):
        b = latents.shape[0]
        x = torch.cat([latents, latents])  # (2B, C, s, s)
        z = torch.cat([torch.zeros_like(cond), cond])  # (2B, 64, H)
        v = self.dit(x, timestep.expand(2 * b), z)  # (2B, C, s, s)
        v_uncond, v_cond = v[:b], v[b:]  # slices, not chunk(): keeps the batch symbolic
        v = v_uncond + guidance.to(v_cond.dtype) * (v_cond - v_uncond)
        return latents + (sigma_next - sigma).to(latents.dtype) * v


class UNetGraph(nn.Module):
    """noise_pred = unet(sample, timestep, encoder_hidden_states) with in-graph SDXL conditions."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.decoder.epsilon(sample, timestep, encoder_hidden_states)


class UNetStepGraph(nn.Module):
    """One guided Euler-discrete step (epsilon prediction), CFG batch [features, negative]."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, latents, timestep, sigma, sigma_next, features, negative, guidance):
        b = latents.shape[0]
        scale = torch.rsqrt(sigma * sigma + 1).to(latents.dtype)  # scale_model_input
        model_in = torch.cat([latents, latents]) * scale  # (2B, 4, l, l)
        feats = torch.cat([features, negative.expand(b, -1, -1)])  # (2B, 64, C)
        eps = self.decoder.epsilon(model_in, timestep.expand(2 * b), feats)  # (2B, 4, l, l)
        eps_cond, eps_neg = eps[:b], eps[b:]
        eps = eps_neg + guidance.to(eps_cond.dtype) * (eps_cond - eps_neg)
        return latents + (sigma_next - sigma).to(latents.dtype) * eps


class VAEDecoderGraph(nn.Module):
    """images in [0, 1] = decode(latents / scaling)."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, latents):
        return self.decoder.decode_latents(latents)
