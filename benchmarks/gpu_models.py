"""The four generation graphs at true shapes for `gpu_check.py`, in plain PyTorch.

The lent GPU machines have PyTorch and transformers but no diffusers, and latency does not depend
on weight values, so the GPU check times random-weight models at the true shapes: our own NextDiT
(`training.model.dit`, no diffusers), transformers' Qwen2.5-VL text decoder, and here
layout-equivalent stand-ins for the SDXL-layout UNet and VAE decoder: the same layers in the same
order at the same widths as diffusers' `UNet2DConditionModel` (linear projections, GEGLU
feed-forward, `text_time` added embedding) and `AutoencoderKL`'s decoder (+ `post_quant_conv`),
built from our `DecoderConfig`. The tests check that both have exactly diffusers' parameter count
and FLOPs (`roofline.py`) at the tiny preset. They are for timing, not for images.

The step functions do what the exported `dit_step` / `unet_step` graphs do (their update fed a
`runtime.jobs.samplers` plan's coefficients): CFG batch, model,
guidance and the Euler update. `fp8_linears` swaps a module's `nn.Linear`s for FP8 matmuls
(`torch._scaled_mm`, e4m3, per-tensor scales: static for the weight, dynamic for the input)
where the shapes fit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import roofline
from training.config import DecoderConfig
from training.model.dit import NextDiTCrossAttn

PROMPT_TOKENS = 128


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers' `Timesteps(dim, flip_sin_to_cos=True, shift=0)`: (N,) -> (N, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([args.cos(), args.sin()], dim=-1)


class Resnet(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout) if temb else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, cout, h, w)
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, ctx_dim: int | None = None, bias: bool = False):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(ctx_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(ctx_dim or dim, dim, bias=bias)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        ctx = x if ctx is None else ctx
        q, k, v = (
            t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)  # (B, heads, N, d)
            for t in (self.to_q(x), self.to_k(ctx), self.to_v(ctx))
        )
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.to_out(out)


class TransformerBlock(nn.Module):
    """BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, ctx_dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.attn1 = Attention(dim, heads)
        self.attn2 = Attention(dim, heads, ctx_dim)
        self.ff_proj = nn.Linear(dim, 8 * dim)  # GEGLU: value and gate, 4*dim each
        self.ff_out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), ctx)
        value, gate = self.ff_proj(self.norm3(x)).chunk(2, dim=-1)
        return x + self.ff_out(value * F.gelu(gate))


class Transformer2D(nn.Module):
    def __init__(self, ch: int, heads: int, depth: int, ctx_dim: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.blocks = nn.ModuleList(TransformerBlock(ch, heads, ctx_dim) for _ in range(depth))
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, hw, C)
        for block in self.blocks:
            t = block(t, ctx)
        return self.proj_out(t).reshape(b, h, w, c).permute(0, 3, 1, 2) + x


class Stage(nn.Module):
    """One down/up block: resnets, optional transformers, optional resampling conv."""

    def __init__(self, resnets, attentions, resample: nn.Module | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.resample = resample


class UNetStandIn(nn.Module):
    """SDXL-layout UNet2DConditionModel (epsilon) with the `text_time` added embedding."""

    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        ch, g, x = c.block_out_channels, c.norm_num_groups, c.cross_attention_dim
        heads, depth, temb = c.attention_head_dim, c.transformer_layers_per_block, 4 * ch[0]
        self.time_dim, self.add_dim = ch[0], c.addition_time_embed_dim
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.time_embedding = nn.Sequential(
            nn.Linear(ch[0], temb), nn.SiLU(), nn.Linear(temb, temb)
        )
        self.add_embedding = nn.Sequential(
            nn.Linear(c.projection_class_embeddings_input_dim, temb),
            nn.SiLU(),
            nn.Linear(temb, temb),
        )
        last = len(ch) - 1
        skips, cin, self.down = [ch[0]], ch[0], nn.ModuleList()
        for i, kind in enumerate(c.down_block_types):
            res, att = [], []
            for _ in range(c.layers_per_block):
                res.append(Resnet(cin, ch[i], temb, g))
                if kind.startswith("CrossAttn"):
                    att.append(Transformer2D(ch[i], heads[i], depth[i], x, g))
                cin = ch[i]
                skips.append(cin)
            down = nn.Conv2d(cin, cin, 3, stride=2, padding=1) if i < last else None
            skips += [cin] if down is not None else []
            self.down.append(Stage(res, att, down))
        self.mid = Stage(
            [Resnet(ch[-1], ch[-1], temb, g), Resnet(ch[-1], ch[-1], temb, g)],
            [Transformer2D(ch[-1], heads[-1], depth[-1], x, g)],
            None,
        )
        prev, self.up = ch[-1], nn.ModuleList()
        for j, kind in enumerate(c.up_block_types):
            i, res, att = last - j, [], []
            for k in range(c.layers_per_block + 1):
                res.append(Resnet((prev if k == 0 else ch[i]) + skips.pop(), ch[i], temb, g))
                if kind.startswith("CrossAttn"):
                    att.append(Transformer2D(ch[i], heads[i], depth[i], x, g))
            prev = ch[i]
            self.up.append(
                Stage(res, att, nn.Conv2d(prev, prev, 3, padding=1) if j < last else None)
            )
        self.norm_out = nn.GroupNorm(g, ch[0])
        self.conv_out = nn.Conv2d(ch[0], c.latent_channels, 3, padding=1)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        """sample (B, 4, l, l), timestep (B,), features (B, 64, C), text_embeds (B, C),
        time_ids (B, 6) -> epsilon (B, 4, l, l)."""
        b, dtype, ctx = sample.shape[0], sample.dtype, encoder_hidden_states
        emb = self.time_embedding(sinusoid(timestep, self.time_dim).to(dtype))  # (B, 4*C0)
        added = sinusoid(time_ids.flatten(), self.add_dim).to(dtype).reshape(b, -1)  # (B, 6*256)
        emb = emb + self.add_embedding(torch.cat([text_embeds, added], dim=-1))
        x = self.conv_in(sample)
        skips = [x]
        for stage in self.down:
            for k, resnet in enumerate(stage.resnets):
                x = resnet(x, emb)
                if len(stage.attentions):
                    x = stage.attentions[k](x, ctx)
                skips.append(x)
            if stage.resample is not None:
                x = stage.resample(x)
                skips.append(x)
        x = self.mid.resnets[1](self.mid.attentions[0](self.mid.resnets[0](x, emb), ctx), emb)
        for stage in self.up:
            for k, resnet in enumerate(stage.resnets):
                x = resnet(torch.cat([x, skips.pop()], dim=1), emb)
                if len(stage.attentions):
                    x = stage.attentions[k](x, ctx)
            if stage.resample is not None:
                x = stage.resample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(x)))


class VAEAttention(nn.Module):
    """The VAE mid-block attention: one head over all pixels, biased projections, residual."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.attn = Attention(ch, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, hw, C)
        return self.attn(t).transpose(1, 2).reshape(b, c, h, w) + x


class VAEDecoderStandIn(nn.Module):
    """post_quant_conv + AutoencoderKL decoder; `forward` matches the `vae_decoder` graph."""

    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        ch, g, lc = (
            list(reversed(c.vae_block_out_channels)),
            c.vae_norm_num_groups,
            c.latent_channels,
        )
        self.scaling = c.vae_scaling_factor
        self.post_quant_conv = nn.Conv2d(lc, lc, 1)
        self.conv_in = nn.Conv2d(lc, ch[0], 3, padding=1)
        self.mid = Stage([Resnet(ch[0], ch[0], 0, g, 1e-6) for _ in range(2)], [], None)
        self.mid_attn = VAEAttention(ch[0], g)
        prev, self.up = ch[0], nn.ModuleList()
        for i, cout in enumerate(ch):
            n = c.vae_layers_per_block + 1
            res = [Resnet(prev if k == 0 else cout, cout, 0, g, 1e-6) for k in range(n)]
            up = nn.Conv2d(cout, cout, 3, padding=1) if i < len(ch) - 1 else None
            self.up.append(Stage(res, [], up))
            prev = cout
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 3, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, 4, l, l) -> images (B, 3, 8l, 8l) in [0, 1]."""
        x = self.conv_in(self.post_quant_conv(latents / self.scaling))
        x = self.mid.resnets[1](self.mid_attn(self.mid.resnets[0](x)))
        for stage in self.up:
            for resnet in stage.resnets:
                x = resnet(x)
            if stage.resample is not None:
                x = stage.resample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return (self.conv_out(F.silu(self.norm_out(x))) / 2 + 0.5).clamp(0, 1)


class FP8Linear(nn.Module):
    """y = x W^T + b with e4m3 operands and per-tensor scales (weight static, input dynamic)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()  # (out, in)
        scale = w.abs().amax().float().clamp(min=1e-12) / 448.0
        self.register_buffer("weight8", (w.float() / scale).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale)
        self.linear = linear  # for inputs whose row count does not fit (not a multiple of 16)

    @property
    def weight(self) -> torch.Tensor:  # modules that read a Linear's weight (dtype, device)
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (M, in)
        if rows.shape[0] % 16:
            return self.linear(x)
        scale = rows.abs().amax().float().clamp(min=1e-12) / 448.0
        x8 = (rows.float() / scale).to(torch.float8_e4m3fn).contiguous()  # row-major for cuBLASLt
        if x.is_cuda:
            y = torch._scaled_mm(
                x8, self.weight8.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=x.dtype
            )  # (M, out)
        else:  # CPU (dry runs): the same quantized operands, dequantized (CPU fp8 GEMM is slow)
            w = self.weight8.float() * self.weight_scale
            y = ((x8.float() * scale) @ w.t()).to(x.dtype)
        if self.linear.bias is not None:
            y = y + self.linear.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def fp8_linears(module: nn.Module) -> int:
    """Swap, in place, every Linear whose in/out features are multiples of 16 for `FP8Linear`
    (use it on a copy to keep the original). Returns the number swapped."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            fits = isinstance(child, nn.Linear) and not child.in_features % 16
            if fits and not child.out_features % 16:
                setattr(parent, name, FP8Linear(child))
                swapped += 1
    return swapped


# the four generation graphs at true shapes ------------------------------------------------------
def dit_step(m, x, prev, t, c_velocity, c_prev, cond, guidance):
    """CFG batch [zeros, cond] + velocity + guidance + the samplers' linear update
    (`runtime.jobs.samplers`, as the exported `dit_step`): x (1, C, 8, 8); returns the next x."""
    v_u, v_c = m(torch.cat([x, x]), t.expand(2), torch.cat([torch.zeros_like(cond), cond])).chunk(2)
    return x + c_velocity * (v_u + guidance * (v_c - v_u)) + c_prev * prev


def unet_step(m, latents, prev, t, in_scale, c_sample, c_eps, c_prev, feats, text, time_ids,
              guidance):  # fmt: skip
    """Scale + CFG batch [cond, neg] + epsilon + guidance + the samplers' linear update
    (`runtime.jobs.samplers`, as the exported `unet_step`): latents (1, 4, l, l)."""
    x = torch.cat([latents, latents]) * in_scale
    e_c, e_n = m(x, t.expand(2), feats, text, time_ids).chunk(2)
    return c_sample * latents + c_eps * (e_n + guidance * (e_c - e_n)) + c_prev * prev


def prefill(m, embeds, positions):
    return m(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state


def vae_decode(m, latents):
    return m(latents)


def build(cfg, dev, dtype) -> dict:
    """name -> (model, static inputs, step function, FLOPs per call, calls per image)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    from training.model.backbone import qwen_config

    b, d, dec = cfg.backbone, cfg.dit, cfg.decoder
    c, s, ls = d.in_channels, d.input_size, dec.latent_size

    def f(*shape):
        return torch.randn(*shape, dtype=dtype)

    def one(v):
        return torch.tensor([v], dtype=dtype)

    pos = torch.arange(PROMPT_TOKENS).view(1, 1, -1).expand(3, 1, -1).contiguous()
    text_cfg = qwen_config(b).text_config
    text_cfg._attn_implementation = "sdpa"
    comps = {
        "prefill": (
            Qwen2_5_VLTextModel(text_cfg), dict(embeds=f(1, PROMPT_TOKENS, b.hidden_size),
            positions=pos), prefill, roofline.prefill_cost(b, PROMPT_TOKENS, lm_head_tokens=0), 1,
        ),
        "dit_step": (
            NextDiTCrossAttn(d), dict(x=f(1, c, s, s), prev=f(1, c, s, s), t=torch.tensor([1000]),
            c_velocity=one(-0.033), c_prev=one(0.0), cond=f(1, b.n_query, b.hidden_size),
            guidance=one(3.0)),
            dit_step, roofline.dit_cost(d, 2), cfg.sampler.steps,
        ),
        "unet_step": (
            UNetStandIn(dec), dict(latents=f(1, 4, ls, ls), prev=f(1, 4, ls, ls),
            t=torch.tensor([999.0]), in_scale=one(0.068), c_sample=one(1.0), c_eps=one(-2.6),
            c_prev=one(0.0), feats=f(2, b.n_query, c), text=f(2, c),
            time_ids=torch.tensor([dec.time_ids] * 2, dtype=dtype), guidance=one(3.0)),
            unet_step, roofline.unet_cost(dec, 2), cfg.sampler.decoder_steps,
        ),
        "vae_decoder": (
            VAEDecoderStandIn(dec), dict(latents=f(1, 4, ls, ls)), vae_decode,
            roofline.vae_decoder_cost(dec, 1), 1,
        ),
    }  # fmt: skip
    return {k: (m.eval().to(dev, dtype), *rest) for k, (m, *rest) in comps.items()}


def cast(inputs: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
