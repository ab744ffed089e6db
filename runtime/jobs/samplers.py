"""The samplers as host plans: one row of step coefficients per call of a fused step graph.

Both step graphs compute a linear multistep update whose coefficients the host feeds each call,
so one exported graph serves every sampler of its family and the sampler's state (the previous
call's prediction) stays on the device as an explicit input and output:

``unet_step`` (epsilon prediction, CFG batch [features, negative]):

    eps      = guided UNet(latents * in_scale, timestep)
    denoised = d_sample * latents + d_eps * eps                      (output: the x0 prediction)
    next     = c_sample * latents + c_eps * eps + c_prev * prev_denoised

``dit_step`` (flow velocity, CFG batch [zeros, cond]):

    velocity = guided DiT(latents, timestep)                         (output)
    next     = latents + c_velocity * velocity + c_prev * prev_velocity

Decoder samplers (diffusers' semantics on the decoder's own scheduler config):

* ``euler``: ``EulerDiscreteScheduler`` (BLIP3-o's, the default): ``in_scale = 1/sqrt(s^2+1)``,
  ``next = latents + (s' - s) eps``.
* ``dpmpp_2m``: ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)``
  (midpoint, ``final_sigmas_type="zero"``): first order on the first and the last step, second
  order between, data prediction ``denoised`` carried as the multistep state.

Flow samplers on BLIP3-o's sigmas ``linspace(1, 1/N, N)`` then 0, the DiT seeing
``int(1000 * sigma)``:

* ``euler``: BLIP3-o's: N calls.
* ``heun``: ``FlowMatchHeunDiscreteScheduler``'s update: an Euler predictor to the next sigma,
  then a corrector averaging the two velocities, except into the final sigma 0 (Euler only):
  2N - 1 calls. The corrector is fed the predicted point, so
  ``next = predicted + dt/2 v2 - dt/2 v1``.
* ``lms``: ``LMSDiscreteScheduler``'s linear multistep at order 2 on the flow ODE
  ``dx/dsigma = v`` (Adams-Bashforth 2 over the sigma grid): the velocity of the previous call
  is the state, first call Euler, N calls. With ``h`` this step and ``h'`` the previous one:
  ``next = x + h (1 + h / 2h') v - h^2 / 2h' v_prev``.

Coefficients are computed in float64 and fed as float32 scalars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.errors import UserError
from runtime.jobs.schedule import (
    dpm_solver_schedule,
    euler_discrete_schedule,
    flow_sigmas,
    flow_timesteps,
)

DECODER_SAMPLERS = ("euler", "dpmpp_2m")
FLOW_SAMPLERS = ("euler", "heun", "lms")


def check_sampler(name: str, value, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise UserError(f"{name} must be one of {', '.join(valid)}, got {value!r}")
    return value


@dataclass(frozen=True)
class UNetStep:
    """The scalars of one `unet_step` call (see the module docstring for the update)."""

    timestep: float
    in_scale: float
    d_sample: float
    d_eps: float
    c_sample: float
    c_eps: float
    c_prev: float


@dataclass(frozen=True)
class DiTStep:
    """The scalars of one `dit_step` call."""

    timestep: int
    c_velocity: float
    c_prev: float


@dataclass(frozen=True)
class DecoderPlan:
    sampler: str
    calls: tuple[UNetStep, ...]
    init_noise_sigma: float  # the initial latents are noise * init_noise_sigma


@dataclass(frozen=True)
class FlowPlan:
    sampler: str
    calls: tuple[DiTStep, ...]


_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                  "timestep_spacing", "steps_offset")  # fmt: skip


def _schedule_options(decoder: dict) -> dict:
    return {k: decoder[k] for k in _SCHEDULE_KEYS}


def decoder_plan(sampler: str, steps: int, decoder: dict) -> DecoderPlan:
    """The `unet_step` calls of `steps` decoder steps; `decoder` is the scheduler config (the
    manifest's `config.decoder`: num_train_timesteps, betas, beta_schedule, timestep_spacing,
    steps_offset)."""
    check_sampler("decoder_sampler", sampler, DECODER_SAMPLERS)
    options = _schedule_options(decoder)
    if sampler == "euler":
        s = euler_discrete_schedule(steps, **options)
        calls = tuple(
            UNetStep(
                timestep=float(s.timesteps[i]),
                in_scale=1.0 / math.sqrt(float(s.sigmas[i]) ** 2 + 1.0),
                d_sample=1.0,
                d_eps=-float(s.sigmas[i]),
                c_sample=1.0,
                c_eps=float(np.float32(s.sigmas[i + 1]) - np.float32(s.sigmas[i])),
                c_prev=0.0,
            )
            for i in range(s.steps)
        )
        return DecoderPlan(sampler, calls, s.init_noise_sigma)
    s = dpm_solver_schedule(steps, **options)
    return DecoderPlan(sampler, tuple(_dpmpp_2m_calls(s)), s.init_noise_sigma)


def _alpha_sigma_lambda(sigma: float) -> tuple[float, float, float]:
    """(alpha_t, sigma_t, lambda_t) of a VP sample at Euler sigma `sigma` (lambda +inf at 0)."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    sigma_t = sigma * alpha
    lam = math.inf if sigma == 0 else math.log(alpha) - math.log(sigma_t)
    return alpha, sigma_t, lam


def _dpmpp_2m_calls(s):
    sigmas = [float(x) for x in s.sigmas]
    n = s.steps
    for i in range(n):
        alpha_s0, sigma_s0, lam_s0 = _alpha_sigma_lambda(sigmas[i])
        alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(sigmas[i + 1])
        d_sample, d_eps = 1.0 / alpha_s0, -sigma_s0 / alpha_s0  # x0 = (x - sigma_t eps) / alpha_t
        # x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) D, D the (extrapolated) x0
        a = alpha_t * -math.expm1(-(lam_t - lam_s0)) if sigmas[i + 1] else 1.0
        ratio = sigma_t / sigma_s0
        first_order = i == 0 or i == n - 1  # no history yet; the final step (sigma 0)
        if first_order:
            w0, w1 = a, 0.0
        else:
            _, _, lam_s1 = _alpha_sigma_lambda(sigmas[i - 1])
            r0 = (lam_s0 - lam_s1) / (lam_t - lam_s0)
            w0, w1 = a * (1.0 + 0.5 / r0), -a * 0.5 / r0  # D = D0 + (D0 - D1) / (2 r0)
        yield UNetStep(
            timestep=float(s.timesteps[i]),
            in_scale=1.0,  # DPM-Solver's scale_model_input is the identity
            d_sample=d_sample,
            d_eps=d_eps,
            c_sample=ratio + w0 * d_sample,
            c_eps=w0 * d_eps,
            c_prev=w1,
        )


def flow_plan(sampler: str, steps: int) -> FlowPlan:
    """The `dit_step` calls of `steps` flow steps."""
    check_sampler("sampler", sampler, FLOW_SAMPLERS)
    sigmas = flow_sigmas(steps)  # (steps + 1,) float32
    timesteps = flow_timesteps(sigmas)  # (steps,) int64
    calls = []
    for i in range(steps):
        dt = float(np.float32(sigmas[i + 1]) - np.float32(sigmas[i]))
        if sampler == "lms" and i > 0:
            h, h_prev = float(sigmas[i + 1]) - float(sigmas[i]), float(sigmas[i] - sigmas[i - 1])
            calls.append(
                DiTStep(int(timesteps[i]), h * (1 + h / (2 * h_prev)), -h * h / (2 * h_prev))
            )
            continue
        if sampler in ("euler", "lms") or sigmas[i + 1] == 0:
            calls.append(DiTStep(int(timesteps[i]), dt, 0.0))
            continue
        calls.append(DiTStep(int(timesteps[i]), dt, 0.0))  # predictor at sigma_i
        t_next = int(np.trunc(np.float32(sigmas[i + 1]) * np.float32(1000)))
        calls.append(DiTStep(t_next, 0.5 * dt, -0.5 * dt))  # corrector at sigma_{i+1}
    return FlowPlan(sampler, tuple(calls))


def forwards(plan: DecoderPlan | FlowPlan) -> int:
    """Model forwards of a plan: two per call (the CFG batch)."""
    return 2 * len(plan.calls)


def scalar(value: float, dtype=np.float32) -> np.ndarray:
    return np.array([value], dtype=dtype)


def unet_feeds(call: UNetStep, latents, prev_denoised, features, negative, guidance) -> dict:
    """The feeds of one `unet_step` call."""
    return {
        "latents": latents,
        "prev_denoised": prev_denoised,
        "timestep": scalar(call.timestep),
        "in_scale": scalar(call.in_scale),
        "d_sample": scalar(call.d_sample),
        "d_eps": scalar(call.d_eps),
        "c_sample": scalar(call.c_sample),
        "c_eps": scalar(call.c_eps),
        "c_prev": scalar(call.c_prev),
        "features": features,
        "negative": negative,
        "guidance": scalar(guidance),
    }


def dit_feeds(call: DiTStep, latents, prev_velocity, cond, guidance) -> dict:
    """The feeds of one `dit_step` call."""
    return {
        "latents": latents,
        "prev_velocity": prev_velocity,
        "timestep": scalar(call.timestep, np.int64),
        "c_velocity": scalar(call.c_velocity),
        "c_prev": scalar(call.c_prev),
        "cond": cond,
        "guidance": scalar(guidance),
    }
