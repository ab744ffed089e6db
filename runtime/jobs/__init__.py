"""Jobs: the runtime's caller-driven loops over sessions, one vocabulary for both.

`GenerationJob` (text to image: prefill, DiT flow steps, UNet steps, VAE decode; `generation`)
and `TokenJob` (image understanding: vision, prefill, one decode per token; `answer`) share
`step()`, `done`, `cancelled`, `cancel()` and `result()`. The sampler math they feed is plain
data: `schedule` (sigmas and timesteps) and `samplers` (one row of coefficients per call).
"""
