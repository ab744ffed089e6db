"""Model configuration: one frozen dataclass per component, composed into `ModelConfig`.

The `4b` and `8b` presets carry the published numbers (Qwen2.5-VL-3B / -7B backbones, the
1.37 B-parameter NextDiT, EVA-CLIP-E-14-plus targets, Emu2-Gen's SDXL-layout decoder), so a real
checkpoint loads, exports and runs. `tiny` keeps the real token counts (64 latent queries, an 8x8
grid of target features, a 64-token caption for the DiT) with small widths and a 64x64 image, so
every code path runs on a 2-core CPU. This module imports no torch: the runtime and the exporter's
plain-data parts read it too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# The generation prompt, exactly as BLIP3-o wraps a caption (architecture.md, step 1).
GENERATION_INSTRUCTION = "Please generate image based on the following caption: {caption}"
SYSTEM_PROMPT = "You are a helpful assistant."
CHAT_TEMPLATE = (
    "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# Understanding: one image in the user turn, Qwen2.5-VL's chat layout.
IMAGE_CHAT_TEXT = "<|vision_start|>{image}<|vision_end|>{question}"
IMAGE_PAD = "<|image_pad|>"
# Tokens BLIP3-o adds to the Qwen vocabulary (ids 151665..151667 in the real tokenizer).
ADDED_TOKENS = ("[IMG]", "[/IMG]", "<image>")
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


@dataclass(frozen=True)
class VisionConfig:
    """Qwen2.5-VL vision tower (ViT with 2x2 patch merger and windowed attention)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 2048
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280


@dataclass(frozen=True)
class BackboneConfig:
    """Qwen2.5-VL text decoder + vision tower, plus BLIP3-o's latent queries and added tokens."""

    base_model: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    hidden_size: int = 2048
    num_layers: int = 36
    num_heads: int = 16
    num_kv_heads: int = 2
    intermediate_size: int = 11008
    vocab_size: int = 151668  # after BLIP3-o's resize for [IMG], [/IMG], <image>
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 128_000
    tie_word_embeddings: bool = True
    n_query: int = 64
    # Token ids of the real Qwen2.5 tokenizer; `tiny` uses its own small tokenizer's ids.
    img_token_id: int = 151665  # [IMG]
    image_token_id: int = 151655  # <|image_pad|>
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645  # <|im_end|>
    pad_token_id: int = 151643
    vision: VisionConfig = field(default_factory=VisionConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class DiTConfig:
    """BLIP3-o's `NextDiTCrossAttn` (a Lumina-Next DiT with cross-attention to the queries)."""

    input_size: int = 8  # feature grid side: 8x8 = 64 tokens
    patch_size: int = 1
    in_channels: int = 1792  # width of a target feature (EVA-CLIP)
    dim: int = 1792
    n_layers: int = 24
    n_heads: int = 28
    n_kv_heads: int = 28
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    qk_norm: bool = True
    latent_embedding_size: int = 2048  # backbone hidden size: caption projection input
    rope_theta: float = 10000.0
    rope_grid: int = 384  # the reference builds its RoPE table on 384x384 and crops it
    timestep_frequency_dim: int = 256

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_inner_dim(self) -> int:
        """SwiGLU width with diffusers <= 0.32 semantics: 2/3 of 4*dim, rounded up."""
        inner = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            inner = int(self.ffn_dim_multiplier * inner)
        return self.multiple_of * ((inner + self.multiple_of - 1) // self.multiple_of)

    @property
    def time_embed_dim(self) -> int:
        return min(self.dim, 1024)

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TargetEncoderConfig:
    """EVA-CLIP-style ViT whose pooled patch tokens are the DiT's targets (training only)."""

    name: str = "eva-clip-E-14-plus"
    image_size: int = 448
    patch_size: int = 14
    width: int = 1792
    layers: int = 64
    heads: int = 16
    mlp_dim: int = 15360
    pooling: str = "early_pool2d_4"  # average-pool the patch grid by 4x4 -> 8x8
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pool_factor(self) -> int:
        return pooling_factor(self.pooling)

    @property
    def num_tokens(self) -> int:
        return (self.grid // self.pool_factor) ** 2


@dataclass(frozen=True)
class DecoderConfig:
    """Emu2-Gen's pixel decoder: SDXL-layout UNet, SDXL VAE, Euler discrete scheduler."""

    image_size: int = 1024
    # UNet2DConditionModel
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    layers_per_block: int = 2
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    attention_head_dim: tuple[int, ...] = (5, 10, 20)
    down_block_types: tuple[str, ...] = (
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
    )
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    cross_attention_dim: int = 1792
    # tiny-only: 2-D rotary positions in the UNet's cross-attention (model/cross_attention_rope.py)
    cross_attention_rope: bool = False
    addition_time_embed_dim: int = 256
    norm_num_groups: int = 32
    # AutoencoderKL
    vae_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    vae_layers_per_block: int = 2
    vae_norm_num_groups: int = 32
    vae_scaling_factor: float = 0.13025
    # EulerDiscreteScheduler
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    prediction_type: str = "epsilon"

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale

    @property
    def projection_class_embeddings_input_dim(self) -> int:
        # text_embeds (mean of the features) + 6 time ids, each embedded to addition_time_embed_dim
        return self.cross_attention_dim + 6 * self.addition_time_embed_dim

    @property
    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        s = self.image_size
        return (s, s, 0, 0, s, s)  # original size, crop top-left, target size


DECODER_NEGATIVES = ("blank_prompt", "zeros")
# The engine folder's named sampler presets (`sampler.presets` in its manifest). tiny's "fast" is
# what benchmarks/frontier.py picked on the shipped checkpoint: the fewest model forwards whose
# mini-GenEval stays within 0.03 of BLIP3-o's 30 + 50 Euler steps
# (benchmarks/results/frontier-tiny.json). 4b/8b keep 20 decoder steps of DPM-Solver++ 2M (the
# tiny frontier's 70-forward setting, -0.003 there): their 1024-px SDXL decoder was not measured
# at 10 steps.
FAST_PRESET = {"sampler": "lms", "steps": 15, "decoder_sampler": "euler", "decoder_steps": 10}
FAST_PRESET_1024 = {
    "sampler": "lms", "steps": 15, "decoder_sampler": "dpmpp_2m", "decoder_steps": 20,
}  # fmt: skip


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling defaults of the reference pipeline."""

    steps: int = 30
    guidance: float = 3.0
    decoder_steps: int = 50
    decoder_guidance: float = 3.0
    negative_seed: int = 0  # the decoder's negative features are sampled once with this seed
    # The decoder's CFG negative: "blank_prompt" (BLIP3-o 4b/8b as published: the DiT's features
    # of the blank prompt) or "zeros" (all-zero features: the dropped condition a decoder trained
    # with zeroed conditions, like tiny's UNet, has seen).
    decoder_negative: str = "blank_prompt"
    # The samplers (the runtime's `runtime.jobs.samplers`): BLIP3-o's Euler for both by default; the
    # DiT also takes "heun", the decoder "dpmpp_2m" (diffusers' DPM-Solver++ 2M).
    sampler: str = "euler"
    decoder_sampler: str = "euler"
    presets: dict = field(default_factory=lambda: {"fast": dict(FAST_PRESET_1024)})

    def __post_init__(self) -> None:
        if self.decoder_negative not in DECODER_NEGATIVES:
            raise ValueError(
                f"unknown decoder_negative {self.decoder_negative!r}; valid: "
                f"{', '.join(DECODER_NEGATIVES)}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """A whole BLIP3-o variant."""

    variant: str
    backbone: BackboneConfig
    dit: DiTConfig
    target_encoder: TargetEncoderConfig
    decoder: DecoderConfig
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self) -> None:
        if self.dit.latent_embedding_size != self.backbone.hidden_size:
            raise ValueError(
                f"dit.latent_embedding_size={self.dit.latent_embedding_size} must equal "
                f"backbone.hidden_size={self.backbone.hidden_size}"
            )
        if self.dit.in_channels != self.target_encoder.width:
            raise ValueError(
                f"dit.in_channels={self.dit.in_channels} must equal "
                f"target_encoder.width={self.target_encoder.width}"
            )
        if self.dit.num_tokens != self.backbone.n_query:
            raise ValueError(
                f"the DiT's {self.dit.num_tokens} feature tokens must equal "
                f"backbone.n_query={self.backbone.n_query}"
            )
        if self.target_encoder.num_tokens != self.dit.num_tokens:
            raise ValueError(
                f"target_encoder gives {self.target_encoder.num_tokens} tokens, the DiT "
                f"generates {self.dit.num_tokens}"
            )
        if self.decoder.cross_attention_dim != self.dit.in_channels:
            raise ValueError(
                f"decoder.cross_attention_dim={self.decoder.cross_attention_dim} must equal "
                f"the feature width {self.dit.in_channels}"
            )
        if self.dit.head_dim % 4:
            raise ValueError(f"2-D RoPE needs dit.head_dim divisible by 4, got {self.dit.head_dim}")

    @property
    def feature_width(self) -> int:
        return self.dit.in_channels

    @property
    def image_size(self) -> int:
        return self.decoder.image_size


def pooling_factor(pooling: str) -> int:
    """`early_pool2d_N` -> N; the target encoder's patch grid is average-pooled by NxN."""
    prefix = "early_pool2d_"
    if not pooling.startswith(prefix) or not pooling[len(prefix) :].isdigit():
        raise ValueError(f"unknown pooling {pooling!r}; expected 'early_pool2d_<N>'")
    return int(pooling[len(prefix) :])


def _preset_4b() -> ModelConfig:
    return ModelConfig(
        variant="4b",
        backbone=BackboneConfig(),
        dit=DiTConfig(latent_embedding_size=2048),
        target_encoder=TargetEncoderConfig(),
        decoder=DecoderConfig(),
    )


def _preset_8b() -> ModelConfig:
    return ModelConfig(
        variant="8b",
        backbone=BackboneConfig(
            base_model="Qwen/Qwen2.5-VL-7B-Instruct",
            hidden_size=3584,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            intermediate_size=18944,
            tie_word_embeddings=False,
            max_position_embeddings=128_000,
            vision=VisionConfig(out_hidden_size=3584),
        ),
        dit=DiTConfig(latent_embedding_size=3584),
        target_encoder=TargetEncoderConfig(),
        decoder=DecoderConfig(),
    )


# `tiny` special-token ids are those of the project's tiny tokenizer (training/tokenizer.py):
# the special tokens come first, in QWEN_SPECIAL_TOKENS + ADDED_TOKENS order.
TINY_VOCAB_SIZE = 512


def _tiny_token_id(token: str) -> int:
    return (QWEN_SPECIAL_TOKENS + ADDED_TOKENS).index(token)


def _preset_tiny() -> ModelConfig:
    feature_width = 32
    return ModelConfig(
        variant="tiny",
        backbone=BackboneConfig(
            base_model="tiny (shapes world)",
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=256,
            vocab_size=TINY_VOCAB_SIZE,
            rms_norm_eps=1e-6,
            mrope_section=(4, 6, 6),
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            img_token_id=_tiny_token_id("[IMG]"),
            image_token_id=_tiny_token_id("<|image_pad|>"),
            video_token_id=_tiny_token_id("<|video_pad|>"),
            vision_start_token_id=_tiny_token_id("<|vision_start|>"),
            vision_end_token_id=_tiny_token_id("<|vision_end|>"),
            bos_token_id=_tiny_token_id("<|endoftext|>"),
            eos_token_id=_tiny_token_id("<|im_end|>"),
            pad_token_id=_tiny_token_id("<|endoftext|>"),
            vision=VisionConfig(
                depth=2,
                hidden_size=64,
                intermediate_size=128,
                num_heads=4,
                out_hidden_size=128,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=32,
                fullatt_block_indexes=(1,),
                min_pixels=32 * 32,
                max_pixels=128 * 128,
            ),
        ),
        dit=DiTConfig(
            in_channels=feature_width,
            dim=160,
            n_layers=6,
            n_heads=4,
            n_kv_heads=4,
            multiple_of=64,
            latent_embedding_size=128,
        ),
        target_encoder=TargetEncoderConfig(
            name="tiny-eva-clip",
            image_size=64,
            patch_size=4,
            width=feature_width,
            layers=4,
            heads=4,
            mlp_dim=128,
            pooling="early_pool2d_2",
        ),
        decoder=DecoderConfig(
            image_size=64,
            block_out_channels=(32, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 1),
            attention_head_dim=(2, 4),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=feature_width,
            cross_attention_rope=True,
            addition_time_embed_dim=16,
            norm_num_groups=16,
            vae_block_out_channels=(32, 64, 64),
            vae_layers_per_block=1,
            vae_norm_num_groups=16,
            vae_scaling_factor=0.13025,
        ),
        # zeros: the UNet's dropped condition; fast: the frontier's pick on this checkpoint
        sampler=SamplerConfig(decoder_negative="zeros", presets={"fast": dict(FAST_PRESET)}),
    )


PRESETS = {"tiny": _preset_tiny, "4b": _preset_4b, "8b": _preset_8b}


def from_preset(name: str, **overrides) -> ModelConfig:
    """Return the config of a named variant, optionally with top-level fields replaced.

    `overrides` replace whole fields of `ModelConfig` (e.g. `sampler=SamplerConfig(steps=10)`).
    """
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    config = PRESETS[name]()
    if overrides:
        valid = {f.name for f in dataclasses.fields(ModelConfig)} - {"variant"}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown override(s) {unknown}; valid fields: {sorted(valid)}")
        config = dataclasses.replace(config, **overrides)
    return config


def reduced_depth(config: ModelConfig | str, layers: int) -> ModelConfig:
    """A variant at its real widths with at most `layers` blocks per stack (tests, memory checks).

    The text decoder, the vision tower and the DiT keep `layers` blocks (the vision tower keeps
    its full-attention blocks among them, else makes the last one full); each decoder UNet block
    keeps at most `layers` resnets and transformer layers. Widths, heads, FFN, vocabulary and
    token counts stay those of the variant, so the graphs have the real shapes and weights per
    layer at a fraction of the memory. `variant` stays the preset's name: `depth_label` tells.
    """
    cfg = from_preset(config) if isinstance(config, str) else config
    full = cfg.backbone.num_layers
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= full:
        raise ValueError(
            f"layers must be an integer in [1, {full}] for {cfg.variant}, got {layers!r}"
        )
    b, v, dec = cfg.backbone, cfg.backbone.vision, cfg.decoder
    depth = min(v.depth, layers)
    full_attention = tuple(i for i in v.fullatt_block_indexes if i < depth) or (depth - 1,)
    vision = dataclasses.replace(v, depth=depth, fullatt_block_indexes=full_attention)
    return dataclasses.replace(
        cfg,
        backbone=dataclasses.replace(b, num_layers=layers, vision=vision),
        dit=dataclasses.replace(cfg.dit, n_layers=min(cfg.dit.n_layers, layers)),
        decoder=dataclasses.replace(
            dec,
            layers_per_block=min(dec.layers_per_block, layers),
            transformer_layers_per_block=tuple(
                min(n, layers) for n in dec.transformer_layers_per_block
            ),
        ),
    )


def depth_label(config: ModelConfig) -> str:
    """`4b` for a preset's depth, `4b-L2` for `reduced_depth(4b, 2)`: names folders apart."""
    full = PRESETS[config.variant]().backbone.num_layers
    n = config.backbone.num_layers
    return config.variant if n == full else f"{config.variant}-L{n}"


def to_dict(config) -> dict:
    """A JSON-ready dict of any config dataclass (tuples become lists)."""
    return dataclasses.asdict(config)


def from_dict(data: dict) -> ModelConfig:
    """Inverse of `to_dict(ModelConfig)`; unknown keys are an error naming them. A config
    written before a sampler field existed (`decoder_negative`, `presets`) takes its variant
    preset's value."""
    sampler = data.get("sampler", {})
    if isinstance(sampler, dict) and data.get("variant") in PRESETS:
        preset = PRESETS[data["variant"]]().sampler
        added = {k: getattr(preset, k) for k in ("decoder_negative", "presets") if k not in sampler}
        data = {**data, "sampler": {**sampler, **added}}

    def build(cls, values: dict):
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}")
        kwargs = {}
        for key, value in values.items():
            nested = _NESTED.get((cls, key))
            if nested is not None:
                value = build(nested, value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    return build(ModelConfig, data)


_NESTED = {
    (ModelConfig, "backbone"): BackboneConfig,
    (ModelConfig, "dit"): DiTConfig,
    (ModelConfig, "target_encoder"): TargetEncoderConfig,
    (ModelConfig, "decoder"): DecoderConfig,
    (ModelConfig, "sampler"): SamplerConfig,
    (BackboneConfig, "vision"): VisionConfig,
}
