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
    """One guided flow step of any `runtime.jobs.samplers` flow sampler: batch [zeros, cond],
    v = u + g (c - u), next = x + c_velocity v + c_prev prev_velocity; returns (next, v)."""

    def __init__(self, dit: NextDiTCrossAttn) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, latents, prev_velocity, timestep, c_velocity, c_prev, cond, guidance):
        b = latents.shape[0]
        x = torch.cat([latents, latents])  # (2B, C, s, s)
        z = torch.cat([torch.zeros_like(cond), cond])  # (2B, 64, H)
        v = self.dit(x, timestep.expand(2 * b), z)  # (2B, C, s, s)
        v_uncond, v_cond = v[:b], v[b:]  # slices, not chunk(): keeps the batch symbolic
        v = v_uncond + guidance.to(v_cond.dtype) * (v_cond - v_uncond)
        dtype = latents.dtype
        next_latents = latents + c_velocity.to(dtype) * v + c_prev.to(dtype) * prev_velocity
        return next_latents, v


class UNetGraph(nn.Module):
    """noise_pred = unet(sample, timestep, encoder_hidden_states) with in-graph SDXL conditions."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.decoder.epsilon(sample, timestep, encoder_hidden_states)


class UNetStepGraph(nn.Module):
    """One guided step of any `runtime.jobs.samplers` decoder sampler (epsilon prediction), CFG
    batch
    [features, negative]: eps from the UNet at latents * in_scale, the x0 prediction
    denoised = d_sample x + d_eps eps, next = c_sample x + c_eps eps + c_prev prev_denoised;
    returns (next, denoised)."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(
        self, latents, prev_denoised, timestep, in_scale, d_sample, d_eps, c_sample, c_eps,
        c_prev, features, negative, guidance,
    ):  # fmt: skip
        b, dtype = latents.shape[0], latents.dtype
        model_in = torch.cat([latents, latents]) * in_scale.to(dtype)  # (2B, 4, l, l)
        feats = torch.cat([features, negative.expand(b, -1, -1)])  # (2B, 64, C)
        eps = self.decoder.epsilon(model_in, timestep.expand(2 * b), feats)  # (2B, 4, l, l)
        eps_cond, eps_neg = eps[:b], eps[b:]
        eps = eps_neg + guidance.to(eps_cond.dtype) * (eps_cond - eps_neg)
        denoised = d_sample.to(dtype) * latents + d_eps.to(dtype) * eps
        next_latents = (
            c_sample.to(dtype) * latents + c_eps.to(dtype) * eps + c_prev.to(dtype) * prev_denoised
        )
        return next_latents, denoised


class VAEDecoderGraph(nn.Module):
    """images in [0, 1] = decode(latents / scaling)."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, latents):
        return self.decoder.decode_latents(latents)
