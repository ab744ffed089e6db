"""The loadable components of a pipeline, and which one each graph's export needs.

A build loads one component at a time (`export.source.ModelSource.load`): its parameters by
prefix from the checkpoint, its decoder parts, and the tokenizer where it needs one. The cost
estimates (`export.resources`) count parameters by the same table.
"""

from __future__ import annotations

# component -> (BLIP3o parameter prefixes, decoder parts, needs the tokenizer)
COMPONENTS = {
    "host": (("qwen.model.language_model.embed_tokens.", "latent_queries"), (), True),
    "vision": (("qwen.model.visual.",), (), False),
    "lm": (
        ("qwen.model.language_model.layers.", "qwen.model.language_model.norm.", "qwen.lm_head."),
        (),
        False,
    ),
    "text": (("qwen.model.language_model.", "latent_queries"), (), True),
    "dit": (("dit.",), (), False),
    "unet": ((), ("unet",), False),
    "vae": ((), ("vae",), False),
}
GRAPH_COMPONENT = {
    **{"vision": "vision", "prefill": "lm", "decode": "lm", "dit": "dit", "dit_step": "dit"},
    **{"unet": "unet", "unet_step": "unet", "vae_decoder": "vae"},
}
# what calibration loads, in order: the components of the graphs a generation job runs
# (prefill, dit_step, unet_step, vae_decoder), stage by stage over all prompts
CALIBRATION_PHASES = ("lm", "dit", "unet", "vae")
