"""The graphs of a BLIP3-o engine folder and their specs, from plain model dimensions.

| graph         | computes                                                     | used for      |
|---------------|--------------------------------------------------------------|---------------|
| `vision`      | Qwen2.5-VL ViT on window-ordered patches -> merged embeds    | understanding |
| `prefill`     | text decoder over input embeddings -> hidden, logits, KV     | both          |
| `decode`      | token + per-layer KV cache (read) -> logits, its K/V row      | understanding |
| `dit`         | NextDiT velocity on the CFG batch                            | generation    |
| `dit_step`    | CFG batch + DiT + guidance + flow sampler update, fused      | generation    |
| `unet`        | decoder UNet epsilon on the CFG batch                        | generation    |
| `unet_step`   | scale + CFG batch + UNet + guidance + sampler update, fused  | generation    |
| `vae_decoder` | latents -> images in [0, 1]                                  | generation    |

Token embedding lookups and M-RoPE / vision-grid metadata stay on the host (numpy). The specs
are built by the exporter from the model config and stored in the engine folder's manifest; the
runtime reads them back from there. The step graphs take their update's coefficients as
scalars (`runtime.jobs.samplers`): one graph serves every sampler of its family.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.folder.spec import Dim, GraphSpec, TensorSpec

GRAPHS = ("vision", "prefill", "decode", "dit", "dit_step", "unet", "unet_step", "vae_decoder")
GENERATION_GRAPHS = ("prefill", "dit_step", "unet_step", "vae_decoder")
# What the runtime runs (the default build): the raw `dit` / `unet` graphs duplicate the step
# graphs' weights and are built only on request (`--graphs dit unet`).
RUNTIME_GRAPHS = ("vision", "prefill", "decode", "dit_step", "unet_step", "vae_decoder")


# The guidance scales a step graph takes (the runtime's params accept this range; sample
# feeds draw from it). Classifier-free guidance past ~7.5 already saturates on every variant;
# a bound refuses absurd values (1e38 overflows the guided combine to inf: a black image).
MAX_GUIDANCE = 10.0


def latent_side(decoder: dict) -> int:
    """The decoder latents' side from a manifest's `config.decoder`: the image size over the
    VAE's downsampling (a factor 2 per block after the first). The one place of this formula."""
    return decoder["image_size"] // 2 ** (len(decoder["vae_block_out_channels"]) - 1)


UNDERSTANDING_GRAPHS = ("vision", "prefill", "decode")


def cache_names(num_layers: int) -> list[tuple[str, str]]:
    """The decode graph's KV cache inputs, (keys, values) per layer: `cache_keys.{i}` and
    `cache_values.{i}`, each (B, KV, capacity, D). One input per layer, so a graph reads each
    layer's cache where it lies (a stacked input is sliced, i.e. copied, once per layer)."""
    return [(f"cache_keys.{i}", f"cache_values.{i}") for i in range(num_layers)]


def cache_feeds(keys, values) -> dict:
    """The decode graph's cache inputs from stacked (L, B, KV, C, D) keys and values arrays:
    one view per layer and side (numpy: no copy)."""
    return {
        name: side[i]
        for i, pair in enumerate(cache_names(len(keys)))
        for name, side in zip(pair, (keys, values))
    }


@dataclass(frozen=True)
class GraphDims:
    """Plain model dimensions and profile limits the graph specs depend on."""

    hidden: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    patch_dim: int  # 3 * temporal_patch * patch * patch
    merge_unit: int  # spatial_merge ** 2
    min_patches: int
    max_patches: int
    opt_patches: int
    n_query: int
    feature_width: int
    feature_side: int
    latent_channels: int
    latent_size: int
    image_size: int
    max_prompt: int  # longest prefill (prompt + image tokens + queries)
    max_seq: int  # longest KV cache (prefill + generated tokens)
    max_images: int = 4
    opt_prompt: int = 128


def graph_specs(d: GraphDims) -> dict[str, GraphSpec]:
    """All graph specs of a variant, keyed by graph name (in `GRAPHS` order)."""
    F = "float"
    images = Dim("batch", 1, 1, d.max_images)
    cfg_batch = Dim("cfg_batch", 2, 2, 2 * d.max_images)
    patches = Dim("patches", d.min_patches, d.opt_patches, d.max_patches)
    merged = Dim(
        "merged",
        d.min_patches // d.merge_unit,
        d.opt_patches // d.merge_unit,
        d.max_patches // d.merge_unit,
    )
    seq = Dim("seq", 1, d.opt_prompt, d.max_prompt)
    capacity = Dim("capacity", 2, min(d.max_seq, 2 * d.opt_prompt), d.max_seq)
    text_batch = Dim("text_batch", 1, 1, d.max_images)
    kv = (d.num_layers, "text_batch", d.num_kv_heads)
    layer_kv = kv[1:]  # one layer's (B, KV)
    c, s = d.feature_width, d.feature_side
    lc, ls = d.latent_channels, d.latent_size
    one = (1,)
    specs = [
        GraphSpec(
            "vision",
            inputs=(
                TensorSpec("pixel_values", F, ("patches", d.patch_dim)),
                TensorSpec("rotary_pos_ids", "int64", ("patches", 2), low=0, high=d.max_patches),
                TensorSpec("full_segments", "int64", ("patches",), low=0, high=d.max_patches),
                TensorSpec("window_segments", "int64", ("patches",), low=0, high=d.max_patches),
                TensorSpec("reverse_index", "int64", ("merged",), low=0, high="merged"),
            ),
            outputs=(TensorSpec("image_embeds", F, ("merged", d.hidden)),),
            dims=(patches, merged),
        ),
        GraphSpec(
            "prefill",
            inputs=(
                TensorSpec("inputs_embeds", F, ("text_batch", "seq", d.hidden)),
                TensorSpec(
                    "position_ids", "int64", (3, "text_batch", "seq"), low=0, high=d.max_seq
                ),
            ),
            outputs=(
                TensorSpec("hidden_states", F, ("text_batch", "seq", d.hidden)),
                TensorSpec("logits", F, ("text_batch", d.vocab_size)),
                TensorSpec("present_keys", F, (*kv, "seq", d.head_dim)),
                TensorSpec("present_values", F, (*kv, "seq", d.head_dim)),
            ),
            dims=(text_batch, seq),
        ),
        GraphSpec(
            "decode",
            inputs=(
                TensorSpec("inputs_embeds", F, ("text_batch", 1, d.hidden)),
                TensorSpec("position_ids", "int64", (3, "text_batch", 1), low=0, high=d.max_seq),
                TensorSpec("cache_position", "int64", one, low=1, high="capacity"),
                *(
                    TensorSpec(name, F, (*layer_kv, "capacity", d.head_dim))
                    for pair in cache_names(d.num_layers)
                    for name in pair
                ),
            ),
            outputs=(
                TensorSpec("logits", F, ("text_batch", d.vocab_size)),
                TensorSpec("new_keys", F, (*kv, 1, d.head_dim)),
                TensorSpec("new_values", F, (*kv, 1, d.head_dim)),
            ),
            dims=(text_batch, capacity),
        ),
        GraphSpec(
            "dit",
            inputs=(
                TensorSpec("x", F, ("cfg_batch", c, s, s)),
                TensorSpec("timestep", "int64", ("cfg_batch",), low=0, high=1000),
                TensorSpec("z_latents", F, ("cfg_batch", d.n_query, d.hidden)),
            ),
            outputs=(TensorSpec("velocity", F, ("cfg_batch", c, s, s)),),
            dims=(cfg_batch,),
        ),
        GraphSpec(
            "dit_step",
            inputs=(
                TensorSpec("latents", F, ("batch", c, s, s)),
                TensorSpec("prev_velocity", F, ("batch", c, s, s)),
                TensorSpec("timestep", "int64", one, low=0, high=1000),
                TensorSpec("c_velocity", "float32", one, low=-1.0, high=0.0),
                TensorSpec("c_prev", "float32", one, low=-0.5, high=0.5),
                TensorSpec("cond", F, ("batch", d.n_query, d.hidden)),
                TensorSpec("guidance", "float32", one, low=0.0, high=MAX_GUIDANCE),
            ),
            outputs=(
                TensorSpec("next_latents", F, ("batch", c, s, s)),
                TensorSpec("velocity", F, ("batch", c, s, s)),
            ),
            dims=(images,),
        ),
        GraphSpec(
            "unet",
            inputs=(
                TensorSpec("sample", F, ("cfg_batch", lc, ls, ls)),
                TensorSpec("timestep", "float32", ("cfg_batch",), low=0.0, high=1000.0),
                TensorSpec("encoder_hidden_states", F, ("cfg_batch", d.n_query, c)),
            ),
            outputs=(TensorSpec("noise_pred", F, ("cfg_batch", lc, ls, ls)),),
            dims=(cfg_batch,),
        ),
        GraphSpec(
            "unet_step",
            inputs=(
                TensorSpec("latents", F, ("batch", lc, ls, ls)),
                TensorSpec("prev_denoised", F, ("batch", lc, ls, ls)),
                TensorSpec("timestep", "float32", one, low=0.0, high=1000.0),
                TensorSpec("in_scale", "float32", one, low=0.05, high=1.0),
                TensorSpec("d_sample", "float32", one, low=1.0, high=20.0),
                TensorSpec("d_eps", "float32", one, low=-20.0, high=0.0),
                TensorSpec("c_sample", "float32", one, low=0.0, high=20.0),
                TensorSpec("c_eps", "float32", one, low=-20.0, high=0.0),
                TensorSpec("c_prev", "float32", one, low=-1.0, high=0.0),
                TensorSpec("features", F, ("batch", d.n_query, c)),
                TensorSpec("negative", F, (1, d.n_query, c)),
                TensorSpec("guidance", "float32", one, low=0.0, high=MAX_GUIDANCE),
            ),
            outputs=(
                TensorSpec("next_latents", F, ("batch", lc, ls, ls)),
                TensorSpec("denoised", F, ("batch", lc, ls, ls)),
            ),
            dims=(images,),
        ),
        GraphSpec(
            "vae_decoder",
            inputs=(TensorSpec("latents", F, ("batch", lc, ls, ls)),),
            outputs=(TensorSpec("images", F, ("batch", 3, d.image_size, d.image_size)),),
            dims=(images,),
        ),
    ]
    return {spec.name: spec for spec in specs}
