"""The frozen parts, trained first as BLIP3-o had them pretrained: the target encoder and decoder.

`target_encoder`: the tiny EVA-CLIP-style ViT (`TargetEncoder`) trained as a CLIP against a small
CLIP text tower on (image, canonical caption) pairs, symmetric InfoNCE. The image embedding is an
attention pool over the 64 pooled patch tokens themselves, so the tokens the DiT later generates
are the ones that must carry the caption's content (colors, shapes, counts, layout). The ViT's
position embedding starts as a 2-D sin/cos code so the tokens carry their place on the grid (a
diffusers UNet's cross-attention gives them none; the tiny decoder adds RoPE there as well). At
the end, per-channel mean/std of the tokens over training images are recorded: every later
consumer uses `normalized_features`, and the DiT generates, and the decoder reads, features in
that normalized space.

`decoder`: the tiny AutoencoderKL (L1 + MSE reconstruction, small KL), whose latents are then
standardized by folding per-channel statistics into `quant_conv`/`post_quant_conv` so that
`latents * scaling_factor` has unit variance; then the UNet, epsilon prediction on DDPM noise of the
scheduler's scaled_linear betas, conditioned exactly as `Decoder.epsilon` feeds it on the frozen
encoder's normalized features of the same image (10% of them zeroed, the CFG negative's slot),
each image at several noise levels per batch, Min-SNR weighted.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from training.config import ModelConfig
from training.eval.detect import detect
from training.model.decoder import Decoder, scheduler_kwargs
from training.model.target_encoder import TargetEncoder
from training.train.common import images_tensor, step_generator

CAPTION_TOKENS = 32  # longest caption of the grammar is ~15 tokens of the tiny tokenizer
EMBED_DIM = 64


# ---------------------------------------------------------------- target encoder (CLIP)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """2-D sin/cos position code (grid*grid, dim): first half rows, second half columns."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # (D/4,)
    pos = torch.arange(grid, dtype=torch.float64)
    angles = pos[:, None] * freqs[None] * math.pi / 2  # (g, D/4)
    code = torch.cat([angles.sin(), angles.cos()], dim=1)  # (g, D/2)
    rows = code[:, None, :].expand(grid, grid, -1)
    cols = code[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, 2 * code.shape[1]).float()


def init_target_encoder(encoder: TargetEncoder) -> None:
    """Pixel-sized patch embedding and a 2-D sin/cos position code (class slot zero)."""
    emb = encoder.vit.embeddings
    cfg = encoder.config
    with torch.no_grad():
        fan_in = 3 * cfg.patch_size**2
        emb.patch_embedding.weight.normal_(0.0, fan_in**-0.5)
        code = torch.zeros_like(emb.position_embedding.weight)  # (1 + g*g, W)
        code[1:, : 4 * (cfg.width // 4)] = 0.5 * sincos_2d(cfg.grid, 4 * (cfg.width // 4))
        emb.position_embedding.weight.copy_(code)


class AttentionPool(nn.Module):
    """One learned query attending over the target tokens -> the CLIP image embedding."""

    def __init__(self, width: int, heads: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.query = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.proj = nn.Linear(width, out, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)  # (B, 64, W)
        pooled, _ = self.attn(self.query.expand(x.shape[0], -1, -1), x, x)  # (B, 1, W)
        return self.proj(pooled[:, 0])  # (B, out)


def text_tower(vocab_size: int) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CAPTION_TOKENS,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return CLIPTextModel(cfg)


class ClipObjective(nn.Module):
    """Symmetric InfoNCE between pooled target tokens and caption embeddings."""

    def __init__(self, encoder: TargetEncoder, vocab_size: int) -> None:
        super().__init__()
        w = encoder.config.width
        self.encoder = encoder
        encoder.vit.post_layernorm.requires_grad_(False)  # only feeds the unused CLS pooler
        self.pool = AttentionPool(w, encoder.config.heads, EMBED_DIM)
        self.text = text_tower(vocab_size)
        self.text_proj = nn.Linear(64, EMBED_DIM, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(self.encoder.normalize(images))  # (B, 64, W)
        return F.normalize(self.pool(tokens), dim=-1)

    def text_embeds(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()  # (B, T)
        hidden = self.text(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, 64)
        last = hidden[torch.arange(ids.shape[0]), lengths - 1]  # (B, 64): the end token
        return F.normalize(self.text_proj(last), dim=-1)

    def forward(self, images, ids, lengths):
        img, txt = self.image_embeds(images), self.text_embeds(ids, lengths)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T  # (B, B)
        labels = torch.arange(logits.shape[0])
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return loss, {"acc": acc}


def caption_ids(tokenizer, captions: list[str], end_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded caption ids with an end token: (B, T) int64 and lengths (B,)."""
    rows = [tokenizer.encode(c, add_special_tokens=False).ids + [end_id] for c in captions]
    longest = max(len(r) for r in rows)
    if longest > CAPTION_TOKENS:
        raise ValueError(f"caption of {longest} tokens exceeds the text tower's {CAPTION_TOKENS}")
    ids = torch.full((len(rows), longest), end_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])


@torch.no_grad()
def retrieval_accuracy(objective: ClipObjective, images, ids, lengths) -> dict:
    img, txt = objective.image_embeds(images), objective.text_embeds(ids, lengths)
    sim = img @ txt.T
    labels = torch.arange(sim.shape[0])
    i2t = (sim.argmax(1) == labels).float().mean().item()
    t2i = (sim.argmax(0) == labels).float().mean().item()
    return {"i2t": i2t, "t2i": t2i}


@torch.no_grad()
def feature_stats(encoder: TargetEncoder, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel mean and std of the pooled tokens over `images`: each (W,)."""
    feats = torch.cat([encoder(encoder.normalize(x)) for x in images.split(64)])  # (N, 64, W)
    flat = feats.reshape(-1, feats.shape[-1])
    return {"mean": flat.mean(0), "std": flat.std(0).clamp_min(1e-6)}


@torch.no_grad()
def normalized_features(encoder: TargetEncoder, stats: dict, images: torch.Tensor) -> torch.Tensor:
    """The DiT's targets / the decoder's conditioning: (B, 64, W), per-channel standardized."""
    feats = encoder(encoder.normalize(images))  # (B, 64, W)
    return (feats - stats["mean"]) / stats["std"]


# ---------------------------------------------------------------- decoder: VAE


class VaeObjective(nn.Module):
    def __init__(self, decoder: Decoder, kl_weight: float) -> None:
        super().__init__()
        self.decoder = decoder
        self.kl_weight = kl_weight

    def forward(self, images, generator):
        x = images * 2 - 1  # (B, 3, S, S) in [-1, 1]
        posterior = self.decoder.vae.encode(x).latent_dist
        recon = self.decoder.vae.decode(posterior.sample(generator)).sample.float()
        l1, mse = F.l1_loss(recon, x), F.mse_loss(recon, x)
        kl = posterior.kl().float().mean() / x[0].numel()
        return l1 + mse + self.kl_weight * kl, {"mse": mse, "kl": kl}


def random_crops(images: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """One random size x size crop per image: (B, 3, size, size)."""
    if size >= images.shape[-1]:
        return images
    top = rng.integers(0, images.shape[-1] - size + 1, size=(images.shape[0], 2))
    return torch.stack([im[:, y : y + size, x : x + size] for im, (y, x) in zip(images, top)])


@torch.no_grad()
def standardize_latents(decoder: Decoder, images: torch.Tensor) -> dict:
    """Fold per-channel latent stats into the VAE so `mean latent * scaling` is ~N(0, 1).

    Exact reparametrization: quant_conv's mean rows become (mean - m) * a and its log-variance
    rows gain 2 log a; post_quant_conv undoes it. a = 1 / (std * scaling_factor).
    """
    vae = decoder.vae
    lat = torch.cat([vae.encode(x * 2 - 1).latent_dist.mean for x in images.split(64)])
    m = lat.mean(dim=(0, 2, 3))  # (C,)
    a = 1.0 / (lat.std(dim=(0, 2, 3)) * decoder.config.vae_scaling_factor)  # (C,)
    c = m.shape[0]
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] *= a.view(-1, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - m) * a
    q.bias[c:] += 2 * a.log()
    p.bias += p.weight[:, :, 0, 0] @ m
    p.weight /= a.view(1, -1, 1, 1)
    std = 1 / a / decoder.config.vae_scaling_factor
    return {"latent_mean": m.tolist(), "latent_std": std.tolist()}


def objects_of(image: np.ndarray) -> list[tuple[str, str]]:
    return sorted((d.color, d.shape) for d in detect(image))


def detection_match(images: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of images whose detected (color, shape) multiset equals the target image's."""

    def to_np(x):
        return (x.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().numpy()

    pairs = zip(to_np(images), to_np(targets))
    return float(np.mean([objects_of(a) == objects_of(b) for a, b in pairs]))


# ---------------------------------------------------------------- decoder: UNet


def ddpm_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    """Training noise with the decoder's own beta schedule (one source: `scheduler_kwargs`)."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    kwargs = scheduler_kwargs(cfg.decoder)
    return DDPMScheduler(**{k: kwargs[k] for k in keys})


class UnetObjective(nn.Module):
    """Epsilon MSE of `Decoder.epsilon` on DDPM-noised latents, features 10% zeroed.

    With `min_snr_gamma` each sample's loss is weighted by min(SNR, gamma) / SNR (Min-SNR, Hang
    et al. 2023): the many nearly clean timesteps stop dominating the gradient, and the noisy
    ones, where the layout is decided from the features, get their share.
    """

    def __init__(
        self, decoder: Decoder, scheduler: DDPMScheduler, p_uncond: float, min_snr_gamma: float = 0
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.scheduler = scheduler
        self.p_uncond = p_uncond
        self.min_snr_gamma = min_snr_gamma

    def forward(self, latents, features, generator):
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator)  # (B, 4, h, w)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator)
        noisy = self.scheduler.add_noise(latents, noise, t)
        keep = (torch.rand(b, generator=generator) >= self.p_uncond).float().view(b, 1, 1)
        eps = self.decoder.epsilon(noisy, t, features * keep)  # (B, 4, h, w)
        per_sample = ((eps.float() - noise) ** 2).mean(dim=(1, 2, 3))  # (B,)
        if self.min_snr_gamma:
            alpha_bar = self.scheduler.alphas_cumprod[t]
            snr = alpha_bar / (1 - alpha_bar)
            per_sample = per_sample * snr.clamp(max=self.min_snr_gamma) / snr
        return per_sample.mean(), {}


@torch.no_grad()
def decoder_latents(decoder: Decoder, images: torch.Tensor) -> torch.Tensor:
    """Scaled VAE latents of images in [0, 1]: (B, 4, h, w)."""
    return decoder.vae.encode(images * 2 - 1).latent_dist.mean * decoder.config.vae_scaling_factor


def unet_batch(
    decoder, encoder, stats, scenes, noise_std: float, g: torch.Generator, repeats: int = 1
) -> dict:
    """Latents and (noised) features of `scenes`, each repeated `repeats` times in a row.

    The VAE encoding costs about as much as the UNet step, so each image serves `repeats`
    noise levels of one batch.
    """
    images = images_tensor(scenes)
    feats = normalized_features(encoder, stats, images).repeat_interleave(repeats, dim=0)
    if noise_std:
        feats = feats + noise_std * torch.randn(feats.shape, generator=g)
    latents = decoder_latents(decoder, images).repeat_interleave(repeats, dim=0)
    return {"latents": latents, "features": feats, "generator": g}


@torch.no_grad()
def reconstruct(
    decoder: Decoder, features: torch.Tensor, steps: int, seed: int, guidance: float = 1.0
) -> torch.Tensor:
    """Images decoded from features with a zero negative, the dropped condition the UNet was
    trained with (guidance 1: the decoder stage's check; the sampler's guidance: the ceiling)."""
    noise = torch.randn(
        (features.shape[0], 4, decoder.config.latent_size, decoder.config.latent_size),
        generator=step_generator(seed, 0, 0, 0),
    )
    zeros = torch.zeros_like(features[:1])
    return decoder.sample(features, zeros, noise, steps=steps, guidance=guidance)
