"""Export-only modules: plain tensors in and out, named like the graph specs' tensors."""


def graph_module(name: str, parts):
    """The wrapper module of graph `name` over loaded pipeline parts (`.model`, `.decoder`)."""
    from export.wrappers import generation, text, vision

    m, dec = parts.model, parts.decoder
    builders = {
        "vision": lambda: vision.VisionGraph(m.qwen.model.visual),
        "prefill": lambda: text.PrefillGraph(m.qwen),
        "decode": lambda: text.DecodeGraph(m.qwen),
        "dit": lambda: generation.DiTGraph(m.dit),
        "dit_step": lambda: generation.DiTStepGraph(m.dit),
        "unet": lambda: generation.UNetGraph(dec),
        "unet_step": lambda: generation.UNetStepGraph(dec),
        "vae_decoder": lambda: generation.VAEDecoderGraph(dec),
    }
    return builders[name]()
