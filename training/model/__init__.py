"""Model components: Qwen2.5-VL backbone + latent queries, NextDiT, target encoder, decoder."""
