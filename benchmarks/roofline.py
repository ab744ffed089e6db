"""Roofline: FLOPs and minimum bytes per graph from the model configs, and per-image lower bounds.

    python benchmarks/roofline.py                  # 4b and 8b tables
    python benchmarks/roofline.py --json out.json  # the same numbers as JSON

FLOPs are matmul-class only (2 per multiply-add in linears, convolutions and attention's two
products), which is what `torch.utils.flop_counter` counts and what tensor cores execute; norms,
activations and softmax are left out (well under 1% here). Attention is counted dense (S x S
even when causal), as dense kernels compute it. Minimum bytes are the graph's weights read once
plus its inputs and outputs (METHOD.md's floor): activations that spill out of L2 come on top.
The layouts follow the modules we run: our NextDiT, diffusers' SDXL `UNet2DConditionModel` and
`AutoencoderKL` decoder, transformers' Qwen2.5-VL text decoder; the unit tests check these counts
against the real modules (parameters and FlopCounterMode) at the tiny preset.

A per-image lower bound sums, per graph call, max(FLOPs / peak, bytes / bandwidth): one prefill,
30 DiT steps and 50 UNet steps at CFG batch 2, one VAE decode at 1024x1024.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import BackboneConfig, DecoderConfig, DiTConfig, from_preset  # noqa: E402


@dataclass(frozen=True)
class Cost:
    """Matmul-class FLOPs and the parameters (weights) a graph reads."""

    flops: int = 0
    params: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.params + other.params)

    def __mul__(self, k: int) -> Cost:
        return Cost(self.flops * k, self.params * k)

    __rmul__ = __mul__


def linear(tokens: int, fin: int, fout: int, bias: bool = True) -> Cost:
    return Cost(2 * tokens * fin * fout, fin * fout + (fout if bias else 0))


def conv2d(batch: int, cin: int, cout: int, out_side: int, k: int = 3, bias: bool = True) -> Cost:
    """A square k x k convolution producing (batch, cout, out_side, out_side)."""
    return Cost(2 * batch * out_side * out_side * cin * cout * k * k, cin * cout * k * k + cout)


def attention(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> Cost:
    """softmax(Q K^T) V: two products of 2 * q_len * kv_len * head_dim FLOPs per head."""
    return Cost(4 * batch * heads * q_len * kv_len * head_dim, 0)


def norm(channels: int, affine_bias: bool = True) -> Cost:
    """LayerNorm / GroupNorm (weight + bias) or RMSNorm (weight only): parameters only."""
    return Cost(0, channels * (2 if affine_bias else 1))


# NextDiT ----------------------------------------------------------------------------------------
def dit_cost(d: DiTConfig, batch: int, context: int | None = None) -> Cost:
    """One NextDiT forward on (batch, C, side, side) with `context` caption tokens."""
    s, ctx = d.num_tokens, context or d.num_tokens
    dim, hd, temb, inner = d.dim, d.head_dim, d.time_embed_dim, d.ffn_inner_dim
    kv = d.n_kv_heads * hd
    t, c = batch * s, batch * ctx
    qkv_norms = norm(dim) + norm(kv)
    layer = (
        Cost(0, d.n_heads)  # cross-attention gate
        + linear(batch, temb, 4 * dim) + norm(dim, False)  # norm1 (adaLN)
        + linear(t, dim, dim, False) + 2 * linear(t, dim, kv, False) + qkv_norms  # attn1
        + attention(batch, d.n_heads, s, s, hd)
        + 2 * linear(t, dim, dim, False) + 2 * linear(c, dim, kv, False) + qkv_norms  # attn2
        + attention(batch, d.n_heads, s, ctx, hd)
        + 2 * linear(t, dim, inner, False) + linear(t, inner, dim, False)  # SwiGLU
        + 4 * norm(dim, False)  # ffn_norm1, norm2, ffn_norm2, norm1_context
    )  # fmt: skip
    patch = d.patch_size * d.patch_size * d.in_channels
    return (
        linear(t, patch, dim)  # patch_embedder
        + linear(c, d.latent_embedding_size, dim) + linear(c, dim, dim)  # caption_projection
        + linear(batch, d.timestep_frequency_dim, temb) + linear(batch, temb, temb)
        + norm(dim) + linear(batch, dim, temb)  # caption embedder
        + d.n_layers * layer
        + linear(batch, temb, dim) + linear(t, dim, patch)  # final layer
    )  # fmt: skip


# SDXL-layout UNet and VAE decoder (diffusers semantics) -----------------------------------------
def resnet(batch: int, cin: int, cout: int, side: int, temb: int) -> Cost:
    cost = norm(cin) + conv2d(batch, cin, cout, side) + norm(cout) + conv2d(batch, cout, cout, side)
    if temb:
        cost += linear(batch, temb, cout)
    if cin != cout:
        cost += conv2d(batch, cin, cout, side, k=1)
    return cost


def transformer2d(
    batch: int, ch: int, heads: int, layers: int, side: int, ctx: int, ctx_dim: int
) -> Cost:
    """Transformer2DModel with linear projections: `layers` BasicTransformerBlocks (GEGLU FF)."""
    n, hd = side * side, ch // heads
    t = batch * n
    block = (
        3 * norm(ch)
        + 3 * linear(t, ch, ch, False) + attention(batch, heads, n, n, hd) + linear(t, ch, ch)
        + linear(t, ch, ch, False) + 2 * linear(batch * ctx, ctx_dim, ch, False)
        + attention(batch, heads, n, ctx, hd) + linear(t, ch, ch)
        + linear(t, ch, 8 * ch) + linear(t, 4 * ch, ch)
    )  # fmt: skip
    return norm(ch) + 2 * linear(t, ch, ch) + layers * block


def unet_cost(c: DecoderConfig, batch: int, context: int = 64) -> Cost:
    """One UNet2DConditionModel forward at (batch, 4, latent, latent), `context` feature tokens."""
    ch, side, temb = c.block_out_channels, c.latent_size, 4 * c.block_out_channels[0]
    heads, depth = c.attention_head_dim, c.transformer_layers_per_block  # heads per block

    def attn(i: int, s: int, layers: int) -> Cost:
        return transformer2d(batch, ch[i], heads[i], layers, s, context, c.cross_attention_dim)

    cost = conv2d(batch, c.latent_channels, ch[0], side)
    cost += linear(batch, ch[0], temb) + linear(batch, temb, temb)  # time_embedding
    cost += linear(batch, c.projection_class_embeddings_input_dim, temb) + linear(batch, temb, temb)
    skips, cin, s = [ch[0]], ch[0], side
    for i, kind in enumerate(c.down_block_types):
        for _ in range(c.layers_per_block):
            cost += resnet(batch, cin, ch[i], s, temb)
            if kind.startswith("CrossAttn"):
                cost += attn(i, s, depth[i])
            cin = ch[i]
            skips.append(cin)
        if i < len(ch) - 1:
            s //= 2
            cost += conv2d(batch, cin, cin, s)  # Downsample2D (stride 2)
            skips.append(cin)
    last = len(ch) - 1
    cost += 2 * resnet(batch, ch[-1], ch[-1], s, temb) + attn(last, s, depth[-1])  # mid block
    prev = ch[-1]
    for j, kind in enumerate(c.up_block_types):
        i = last - j
        for k in range(c.layers_per_block + 1):
            cost += resnet(batch, (prev if k == 0 else ch[i]) + skips.pop(), ch[i], s, temb)
            if kind.startswith("CrossAttn"):
                cost += attn(i, s, depth[i])
        prev = ch[i]
        if j < last:
            s *= 2
            cost += conv2d(batch, prev, prev, s)  # Upsample2D (nearest x2, conv)
    return cost + norm(ch[0]) + conv2d(batch, ch[0], c.latent_channels, side)


def vae_decoder_cost(c: DecoderConfig, batch: int = 1) -> Cost:
    """post_quant_conv + AutoencoderKL decoder: (batch, 4, latent, latent) -> (batch, 3, S, S)."""
    ch, s, lc = list(reversed(c.vae_block_out_channels)), c.latent_size, c.latent_channels
    cost = conv2d(batch, lc, lc, s, k=1) + conv2d(batch, lc, ch[0], s)
    n = s * s
    mid_attn = norm(ch[0]) + 4 * linear(batch * n, ch[0], ch[0]) + attention(batch, 1, n, n, ch[0])
    cost += 2 * resnet(batch, ch[0], ch[0], s, 0) + mid_attn
    prev = ch[0]
    for i, cout in enumerate(ch):
        for k in range(c.vae_layers_per_block + 1):
            cost += resnet(batch, prev if k == 0 else cout, cout, s, 0)
        prev = cout
        if i < len(ch) - 1:
            s *= 2
            cost += conv2d(batch, cout, cout, s)
    return cost + norm(ch[-1]) + conv2d(batch, ch[-1], 3, s)


# Qwen2.5-VL text decoder ------------------------------------------------------------------------
def text_layer(b: BackboneConfig, tokens: int, kv_len: int, batch: int = 1) -> Cost:
    h, hd, kv = b.hidden_size, b.head_dim, b.num_kv_heads * b.head_dim
    t = batch * tokens
    return (
        2 * norm(h, False)
        + linear(t, h, h) + 2 * linear(t, h, kv) + linear(t, h, h, False)
        + attention(batch, b.num_heads, tokens, kv_len, hd)
        + 3 * linear(t, h, b.intermediate_size, False)  # gate, up (h -> I), down (I -> h)
    )  # fmt: skip


def prefill_cost(b: BackboneConfig, tokens: int, batch: int = 1, lm_head_tokens: int = 1) -> Cost:
    """Prefill over `tokens` input embeddings (embedding lookup on the host); logits of the
    last `lm_head_tokens` tokens (0: hidden states only, as generation needs)."""
    cost = b.num_layers * text_layer(b, tokens, tokens, batch) + norm(b.hidden_size, False)
    if lm_head_tokens:
        cost += linear(batch * lm_head_tokens, b.hidden_size, b.vocab_size, False)
    return cost


def decode_cost(b: BackboneConfig, past: int) -> Cost:
    """One decode token over `past` cached positions, with logits."""
    layers = b.num_layers * text_layer(b, 1, past + 1)
    return layers + norm(b.hidden_size, False) + linear(1, b.hidden_size, b.vocab_size, False)


def kv_bytes(b: BackboneConfig, positions: int, dtype_bytes: int = 2) -> int:
    return 2 * b.num_layers * b.num_kv_heads * b.head_dim * positions * dtype_bytes


# graphs, devices and bounds ---------------------------------------------------------------------
@dataclass(frozen=True)
class GraphCost:
    name: str
    flops: int
    weight_bytes: int
    io_bytes: int
    calls_per_image: int

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.io_bytes


def graph_costs(variant: str, *, prompt_tokens: int = 128, context_tokens: int = 1024,
                weight_bytes: int = 2, io_bytes: int = 2) -> list[GraphCost]:  # fmt: skip
    """Per-call cost of each graph at the variant's true shapes (one image, CFG batch 2)."""
    cfg = from_preset(variant)
    b, d, dec = cfg.backbone, cfg.dit, cfg.decoder
    feat = d.num_tokens * d.in_channels
    lat = dec.latent_channels * dec.latent_size**2
    rows = [
        ("prefill", prefill_cost(b, prompt_tokens, lm_head_tokens=0), 1,
         2 * prompt_tokens * b.hidden_size * io_bytes + kv_bytes(b, prompt_tokens, io_bytes)),
        # latents and the sampler's state (velocity / x0 prediction), in and out
        ("dit_step", dit_cost(d, 2), cfg.sampler.steps,
         (4 * feat + d.num_tokens * b.hidden_size) * io_bytes),
        ("unet_step", unet_cost(dec, 2), cfg.sampler.decoder_steps,
         (4 * lat + 2 * feat) * io_bytes),
        ("vae_decoder", vae_decoder_cost(dec, 1), 1, (lat + 3 * dec.image_size**2) * io_bytes),
        (f"prefill@{context_tokens}", prefill_cost(b, context_tokens), 0,
         2 * context_tokens * b.hidden_size * io_bytes + kv_bytes(b, context_tokens, io_bytes)),
        (f"decode@{context_tokens}", decode_cost(b, context_tokens), 0,
         kv_bytes(b, context_tokens + 1, io_bytes) + b.vocab_size * 4),
    ]  # fmt: skip
    return [
        GraphCost(name, cost.flops, cost.params * weight_bytes, io, calls)
        for name, cost, calls, io in rows
    ]


@dataclass(frozen=True)
class Device:
    name: str
    peak: dict[str, float]  # dense FLOP/s per precision class: "16-bit", "8-bit"
    bandwidth: float  # bytes/s
    source: str


DEVICES = {
    "h100-sxm": Device(
        "NVIDIA H100 SXM5 80GB",
        {"16-bit": 989e12, "8-bit": 1979e12},
        3.35e12,
        "vendor spec sheet (NVIDIA H100 datasheet: dense BF16 989 TFLOP/s, dense FP8 1979, "
        "HBM3 3.35 TB/s)",
    ),
    "h200": Device(
        "NVIDIA H200 SXM 141GB",
        {"16-bit": 989e12, "8-bit": 1979e12},
        4.8e12,
        "vendor spec sheet (NVIDIA H200 datasheet: dense BF16 989 TFLOP/s, dense FP8 1979, "
        "HBM3e 4.8 TB/s)",
    ),
    "orin-agx-64": Device(
        "Jetson AGX Orin 64GB (GPU only, no DLA)",
        {"16-bit": 42.5e12, "8-bit": 85e12},
        204.8e9,
        "vendor spec sheet (Jetson AGX Orin 64GB: GPU 170 sparse INT8 TOPS -> 85 dense; dense "
        "FP16 taken as half of dense INT8; LPDDR5 204.8 GB/s)",
    ),
}


def call_bound(g: GraphCost, device: Device, precision: str) -> tuple[float, float]:
    """(compute seconds, memory seconds) of one call; the larger is the floor."""
    scale = 0.5 if precision == "8-bit" else 1.0  # 1-byte weights
    return g.flops / device.peak[precision], (
        g.weight_bytes * scale + g.io_bytes
    ) / device.bandwidth


def image_bound(graphs: list[GraphCost], device: Device, precision: str) -> dict[str, float]:
    """Per-image lower bound: seconds per graph (all its calls) and in total."""
    out = {}
    for g in graphs:
        if g.calls_per_image:
            out[g.name] = g.calls_per_image * max(call_bound(g, device, precision))
    out["total"] = sum(out.values())
    return out


def report(variants: list[str]) -> dict:
    result = {"devices": {k: vars(v) for k, v in DEVICES.items()}, "variants": {}}
    for variant in variants:
        graphs = graph_costs(variant)
        bounds = {
            f"{dev}/{prec}": image_bound(graphs, DEVICES[dev], prec)
            for dev in DEVICES
            for prec in ("16-bit", "8-bit")
        }
        result["variants"][variant] = {"graphs": [vars(g) for g in graphs], "bounds": bounds}
    return result


def print_report(result: dict) -> None:
    for variant, data in result["variants"].items():
        print(f"\n{variant}: per call (16-bit weights)")
        print(f"{'graph':<14}{'GFLOP':>10}{'weights MB':>12}{'I/O MB':>9}{'FLOP/B':>8}{'calls':>6}")
        for g in data["graphs"]:
            byts = g["weight_bytes"] + g["io_bytes"]
            print(
                f"{g['name']:<14}{g['flops'] / 1e9:>10.1f}{g['weight_bytes'] / 1e6:>12.0f}"
                f"{g['io_bytes'] / 1e6:>9.1f}{g['flops'] / byts:>8.0f}{g['calls_per_image']:>6}"
            )
        print(
            f"lower bound per image, ms: {'  '.join(data['graphs'][i]['name'] for i in range(4))}"
        )
        for key, b in data["bounds"].items():
            parts = "  ".join(f"{b[g['name']] * 1e3:.1f}" for g in data["graphs"][:4])
            print(f"  {key:<22}{b['total'] * 1e3:>9.1f} ms  ({parts})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", nargs="+", default=["4b", "8b"], choices=["tiny", "4b", "8b"])
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    result = report(args.variant)
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
