"""Flow matching as BLIP3-o trains and samples it, as pure functions.

Convention: sigma = 1 is noise, sigma = 0 is data; x_t = (1 - sigma) x0 + sigma eps; the DiT
predicts the velocity v = eps - x0 and sees the timestep t = 1000 sigma. Training draws sigma
uniformly over 1000 discrete levels (1/1000 .. 1) and drops the conditioning of 10% of the
samples to zeros (the unconditional branch of classifier-free guidance). Sampling follows
diffusers' FlowMatchEulerDiscreteScheduler (shift 1) fed BLIP3-o's sigmas
`linspace(1, 1/steps, steps)` then 0, with the timestep cast to an integer as BLIP3-o does;
`sampler="heun"` follows FlowMatchHeunDiscreteScheduler's update on the same sigmas (an Euler
predictor, then a corrector averaging the two velocities, Euler alone into sigma 0);
`sampler="lms"` is LMSDiscreteScheduler's linear multistep at order 2 on dx/dsigma = v
(Adams-Bashforth 2 over the sigmas, the first step Euler).

Noise convention shared with the runtime: noise is drawn on the host by
`np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)`, so CPU and GPU runs and
the torch-free runtime see the same numbers for a seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000


def sigma_schedule(steps: int) -> torch.Tensor:
    """Sampling sigmas: float32 (steps + 1,), `linspace(1, 1/steps, steps)` then 0."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    return torch.from_numpy(np.append(sigmas, np.float32(0.0)))


def timesteps_for(sigmas: torch.Tensor) -> torch.Tensor:
    """The integer timesteps the DiT sees for each step: (sigmas[:-1] * 1000) truncated, int64."""
    return (sigmas[:-1].float() * NUM_TRAIN_TIMESTEPS).to(torch.long)


def euler_step(
    x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float
) -> torch.Tensor:
    """One Euler step of the flow ODE from sigma to sigma_next."""
    return x + (sigma_next - sigma) * velocity


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + guidance * (cond - uncond)."""
    return uncond + guidance * (cond - uncond)


def host_noise(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Seeded standard-normal noise drawn on the host, one tensor per shape, in order.

    One generator per seed: a generation draws the DiT's noise first, then the decoder's.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    rng = np.random.default_rng(int(seed))
    return [torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)) for shape in shapes]


FLOW_SAMPLERS = ("euler", "heun", "lms")


def sample_features(
    velocity: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    cond: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int,
    guidance: float,
    sampler: str = "euler",
) -> torch.Tensor:
    """Flow sampling with CFG, batch order [uncond (zeros), cond] as in BLIP3-o.

    velocity(x (2B, C, h, w), t (2B,) int64, cond (2B, 64, H)) -> (2B, C, h, w).
    cond: (B, 64, H); noise: (B, C, h, w). Returns the (B, C, h, w) sample at sigma = 0.
    """
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(FLOW_SAMPLERS)}")
    sigmas = sigma_schedule(steps)
    cond_in = torch.cat([torch.zeros_like(cond), cond])  # (2B, 64, H)

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = (sigma.float() * NUM_TRAIN_TIMESTEPS).to(torch.long)  # truncated, as timesteps_for
        t = t.expand(2 * x.shape[0]).to(x.device)  # (2B,)
        v_uncond, v_cond = velocity(torch.cat([x, x]), t, cond_in).chunk(2)
        return cfg_combine(v_uncond, v_cond, guidance)

    x, v_prev = noise.to(cond.dtype), None
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = v_now = guided(x, sigma)
        if sampler == "heun" and sigma_next > 0:
            x_pred = euler_step(x, v, float(sigma), float(sigma_next))
            v = 0.5 * (v + guided(x_pred, sigma_next))
        if sampler == "lms" and v_prev is not None:  # the linear interpolant of v, integrated
            h, h_prev = float(sigma_next - sigma), float(sigma - sigmas[i - 1])
            v = (1 + h / (2 * h_prev)) * v - h / (2 * h_prev) * v_prev
        x = euler_step(x, v, float(sigma), float(sigma_next))
        v_prev = v_now
    return x


TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def sample_training_sigmas(
    batch: int, generator: torch.Generator | None = None, sampling: str = "uniform"
) -> torch.Tensor:
    """Training noise levels, float32 (batch,).

    "uniform": over the 1000 levels {1/1000, ..., 1}, as BLIP3-o trains. "logit_normal": SD3's
    sigma = sigmoid(n), n ~ N(0, 1), which weighs the middle of the path, where a sample's layout
    is decided, over the nearly clean and nearly pure-noise ends.
    """
    if sampling == "uniform":
        index = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
        return (NUM_TRAIN_TIMESTEPS - index).float() / NUM_TRAIN_TIMESTEPS
    if sampling == "logit_normal":
        return torch.sigmoid(torch.randn(batch, generator=generator))
    valid = ", ".join(TIMESTEP_SAMPLING)
    raise ValueError(f"unknown timestep sampling {sampling!r}; valid: {valid}")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps, sigma (B,) broadcast over the other dims."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def drop_conditioning(
    cond: torch.Tensor, p: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero the conditioning of each sample with probability p (CFG dropout)."""
    keep = torch.rand(cond.shape[0], generator=generator) >= p  # (B,)
    return cond * keep.view(-1, *([1] * (cond.ndim - 1))).to(cond)


def flow_matching_loss(
    velocity: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    cond: torch.Tensor,
    *,
    p_uncond: float = 0.1,
    generator: torch.Generator | None = None,
    sampling: str = "uniform",
) -> torch.Tensor:
    """MSE between the predicted and the true velocity eps - x0 at a random sigma per sample
    (`sampling`: how sigma is drawn, `sample_training_sigmas`)."""
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    sigma = sample_training_sigmas(x0.shape[0], generator, sampling).to(x0.device)
    x_t = add_noise(x0, noise, sigma)
    pred = velocity(x_t, sigma * NUM_TRAIN_TIMESTEPS, drop_conditioning(cond, p_uncond, generator))
    return F.mse_loss(pred.float(), (noise - x0).float())
