"""Sampling schedules for BLIP3-o as pure numpy functions (no torch, no diffusers).

Two samplers run per generated image:

* the DiT samples CLIP features by flow matching: sigmas ``linspace(1, 1/steps, steps)`` then 0,
  Euler steps ``x <- x + (sigma_next - sigma) * v``, the DiT seeing ``t = int(1000 * sigma)``;
* the pixel decoder (Emu2-Gen SDXL UNet) samples latents with diffusers' ``EulerDiscreteScheduler``
  (epsilon prediction, scaled-linear betas, "leading" spacing, steps_offset 1).

The arithmetic mirrors diffusers' float32 computations step by step (same dtype at every
intermediate) so that the host schedule equals the reference one; the tests compare against
diffusers itself. The schedule is tiny host data; the per-step tensors stay with the sessions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _check_steps(steps: int, upper: int | None = None) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be an int, got {steps!r} ({type(steps).__name__})")
    if steps < 1 or (upper is not None and steps > upper):
        limit = f"[1, {upper}]" if upper is not None else ">= 1"
        raise ValueError(f"steps must be in {limit}, got {steps}")


# ----------------------------------------------------------------------------------------------
# Flow matching (BLIP3-o DiT)
# ----------------------------------------------------------------------------------------------


def flow_sigmas(steps: int, *, shift: float = 1.0) -> np.ndarray:
    """Flow-matching sigmas for ``steps`` Euler steps: ``linspace(1, 1/steps, steps)`` then 0.

    Same values as diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`` with
    the given ``shift`` (BLIP3-o: 1.0), whose ``sigmas`` attribute this returns.

    Returns:
        float32 array of shape ``(steps + 1,)``, decreasing from 1 to a final 0.
    """
    _check_steps(steps)
    shift = float(shift)  # a Python float keeps the float32 arithmetic below in float32
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)  # (steps,)
    # Same float32 expression (and evaluation order) as diffusers.
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)  # (steps,)
    return np.concatenate([sigmas, np.zeros(1, np.float32)]).astype(np.float32)  # (steps + 1,)


def flow_timesteps(sigmas: np.ndarray, *, num_train_timesteps: int = 1000) -> np.ndarray:
    """Integer timesteps the BLIP3-o DiT receives, one per step (the final sigma 0 has none).

    diffusers computes ``timesteps = sigmas * 1000`` in float32 and BLIP3-o casts them with
    ``.to(torch.long)``, i.e. truncation toward zero (``0.96666664 * 1000 = 966.6666`` gives 966).

    Args:
        sigmas: float32 ``(steps + 1,)`` from :func:`flow_sigmas`.

    Returns:
        int64 array of shape ``(steps,)``.
    """
    sigmas = np.asarray(sigmas)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be 1-D with >= 2 entries (steps + 1), got {sigmas.shape}")
    t = sigmas[:-1].astype(np.float32) * np.float32(num_train_timesteps)  # (steps,) float32
    return np.trunc(t).astype(np.int64)  # (steps,)


def flow_euler_step(x: np.ndarray, v: np.ndarray, sigma: float, sigma_next: float) -> np.ndarray:
    """One flow-matching Euler step: ``x + (sigma_next - sigma) * v`` (velocity ``v = eps - x0``).

    ``dt`` is formed in float32 from the two sigmas and the update runs in float32 (as diffusers,
    which upcasts the sample); the result is float32 whatever the dtype of ``v``.
    """
    dt = np.float32(sigma_next) - np.float32(sigma)
    return (x.astype(np.float32) + dt * v).astype(np.float32)


def cfg_combine(uncond: np.ndarray, cond: np.ndarray, guidance: float) -> np.ndarray:
    """Classifier-free guidance: ``uncond + guidance * (cond - uncond)`` (keeps the input dtype)."""
    return uncond + float(guidance) * (cond - uncond)


# ----------------------------------------------------------------------------------------------
# Euler discrete (Emu2-Gen / SDXL pixel decoder)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscreteSchedule:
    """A discrete scheduler's schedule after ``set_timesteps`` (immutable host data): diffusers'
    ``EulerDiscreteScheduler`` or ``DPMSolverMultistepScheduler``.

    Attributes:
        timesteps: float32 ``(steps,)``, the value the UNet receives at each step.
        sigmas: float32 ``(steps + 1,)``, ending in 0.
        init_noise_sigma: scale of the initial latent noise (``randn * init_noise_sigma``).
    """

    timesteps: np.ndarray
    sigmas: np.ndarray
    init_noise_sigma: float

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=float32)``'s scalar formula: float32 step, first half
    counted from ``start`` and second half from ``end``. (torch's SIMD path differs by <= 1 ulp.)"""
    start32, end32 = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start32], np.float32)
    step = (end32 - start32) / np.float32(n - 1)
    idx = np.arange(n)
    half = n // 2
    out = np.empty(n, np.float32)
    out[:half] = start32 + step * idx[:half].astype(np.float32)
    out[half:] = end32 - step * (n - 1 - idx[half:]).astype(np.float32)
    return out


def _interpolated_sigmas(timesteps: np.ndarray, num_train_timesteps: int, *betas) -> np.ndarray:
    """float32 (steps + 1,): the training sigmas at `timesteps` (linear interpolation, float64
    as numpy's), then a final 0."""
    train_sigmas = _train_sigmas(num_train_timesteps, *betas)  # (T,)
    sigmas = np.interp(timesteps, np.arange(num_train_timesteps), train_sigmas)  # (steps,) f64
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)  # (steps + 1,)


def _frozen(timesteps: np.ndarray, sigmas: np.ndarray, init_noise_sigma: float):
    timesteps.setflags(write=False)
    sigmas.setflags(write=False)
    return DiscreteSchedule(timesteps=timesteps, sigmas=sigmas, init_noise_sigma=init_noise_sigma)


def _train_sigmas(
    num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str
) -> np.ndarray:
    if beta_schedule == "linear":
        betas = _linspace_f32(beta_start, beta_end, num_train_timesteps)  # (T,)
    elif beta_schedule == "scaled_linear":
        betas = _linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2  # (T,)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    # torch's CPU cumprod accumulates float32 in float64 and rounds each output to float32.
    alphas = (np.float32(1.0) - betas).astype(np.float64)  # (T,)
    alphas_cumprod = np.cumprod(alphas).astype(np.float32)  # (T,)
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod).astype(np.float32)  # (T,)


def euler_discrete_schedule(
    steps: int,
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    timestep_spacing: str = "leading",
    steps_offset: int = 1,
) -> DiscreteSchedule:
    """Timesteps and sigmas of diffusers' ``EulerDiscreteScheduler`` (linear interpolation of the
    training sigmas, no Karras/exponential/beta sigmas, final sigma 0).

    Defaults are the Emu2-Gen decoder's scheduler config. ``timestep_spacing`` is one of
    ``"leading"``, ``"trailing"`` or ``"linspace"`` with diffusers' semantics.
    """
    _check_steps(steps, upper=num_train_timesteps)
    if timestep_spacing == "linspace":
        timesteps = np.linspace(0, num_train_timesteps - 1, steps, dtype=np.float32)[::-1].copy()
    elif timestep_spacing == "leading":
        ratio = num_train_timesteps // steps
        timesteps = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.float32)
        timesteps += steps_offset
    elif timestep_spacing == "trailing":
        ratio = num_train_timesteps / steps
        timesteps = np.arange(num_train_timesteps, 0, -ratio).round().astype(np.float32)
        timesteps -= 1
    else:
        raise ValueError(
            f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}"
        )
    sigmas = _interpolated_sigmas(
        timesteps, num_train_timesteps, beta_start, beta_end, beta_schedule
    )  # (steps + 1,)
    max_sigma = sigmas.max()
    if timestep_spacing in ("linspace", "trailing"):
        init_noise_sigma = float(max_sigma)
    else:
        init_noise_sigma = float((max_sigma**2 + np.float32(1)) ** np.float32(0.5))
    logger.debug("euler schedule: %d steps, t0=%s, sigma0=%s", steps, timesteps[0], sigmas[0])
    return _frozen(timesteps, sigmas, init_noise_sigma)


def scale_model_input(x: np.ndarray, sigma: float) -> np.ndarray:
    """UNet input scaling of the Euler sampler: ``x / sqrt(sigma^2 + 1)``."""
    s = np.float32(sigma)
    return (x / ((s**2 + np.float32(1)) ** np.float32(0.5))).astype(np.float32)


def euler_discrete_step(
    x: np.ndarray, eps: np.ndarray, sigma: float, sigma_next: float
) -> np.ndarray:
    """One Euler step for an epsilon-predicting model (``s_churn = 0``, deterministic).

    Mathematically ``x + (sigma_next - sigma) * eps``; computed in diffusers' order
    (x0 prediction, derivative, dt) to match it to float32 rounding.
    """
    s, s_next = np.float32(sigma), np.float32(sigma_next)
    x = x.astype(np.float32)
    x0 = x - s * eps  # predicted clean sample
    derivative = (x - x0) / s
    return (x + derivative * (s_next - s)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# DPM-Solver multistep (the decoder's fast sampler)
# ----------------------------------------------------------------------------------------------


def dpm_solver_schedule(
    steps: int,
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    timestep_spacing: str = "leading",
    steps_offset: int = 1,
) -> DiscreteSchedule:
    """Timesteps and sigmas of diffusers' ``DPMSolverMultistepScheduler`` built from the same
    scheduler config (no Karras/Lu/exponential sigmas, ``final_sigmas_type="zero"``, no lambda
    clipping). Its timesteps are integers (as float32 here, what the UNet receives); the sample
    lives in the variance-preserving space, so ``init_noise_sigma`` is 1.

    ``leading`` spacing differs from Euler's: diffusers divides by ``steps + 1`` and drops the
    last (0) timestep.
    """
    _check_steps(steps, upper=num_train_timesteps)
    last = num_train_timesteps
    if timestep_spacing == "linspace":
        timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif timestep_spacing == "leading":
        ratio = last // (steps + 1)
        timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
        timesteps = timesteps + steps_offset
    elif timestep_spacing == "trailing":
        ratio = num_train_timesteps / steps
        timesteps = np.arange(last, 0, -ratio).round().astype(np.int64) - 1
    else:
        raise ValueError(
            f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}"
        )
    sigmas = _interpolated_sigmas(
        timesteps, num_train_timesteps, beta_start, beta_end, beta_schedule
    )  # (steps + 1,)
    return _frozen(timesteps.astype(np.float32), sigmas, 1.0)
