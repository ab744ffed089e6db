"""runtime.jobs.schedule against diffusers' FlowMatchEulerDiscrete and EulerDiscrete schedulers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from runtime.jobs.schedule import (
    cfg_combine,
    euler_discrete_schedule,
    euler_discrete_step,
    flow_euler_step,
    flow_sigmas,
    flow_timesteps,
    scale_model_input,
)

# Emu2-Gen decoder scheduler config (architecture.md).
DECODER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    timestep_spacing="leading",
    steps_offset=1,
)


def _flow_reference(steps: int, shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler as BLIP3-o sets it up."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps))
    return scheduler


@pytest.mark.parametrize("steps", [1, 2, 10, 30, 50])
def test_flow_sigmas_and_timesteps_equal_diffusers(steps: int) -> None:
    ref = _flow_reference(steps)
    sigmas = flow_sigmas(steps)
    assert sigmas.dtype == np.float32 and sigmas.shape == (steps + 1,)
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
    # What the DiT receives: scheduler.timesteps cast with .to(torch.long).
    expected = ref.timesteps.to(torch.long).numpy()
    got = flow_timesteps(sigmas)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)


def test_flow_timesteps_truncate_not_round() -> None:
    # float32(1 - 1/30 * 1) * 1000 = 966.666..., truncated to 966 (rounding would give 967).
    t = flow_timesteps(flow_sigmas(30))
    assert t[0] == 1000 and t[1] == 966 and t[-1] == 33


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_loop_equals_diffusers(shift: float) -> None:
    steps = 10
    ref = _flow_reference(steps, shift)
    sigmas = flow_sigmas(steps, shift=shift)
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 4, 4)).astype(np.float32)
    velocities = rng.standard_normal((steps, 2, 16, 4, 4)).astype(np.float32)
    x_ref = torch.from_numpy(x.copy())
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(torch.from_numpy(velocities[i]), t, x_ref).prev_sample
        x = flow_euler_step(x, velocities[i], sigmas[i], sigmas[i + 1])
    np.testing.assert_allclose(x, x_ref.numpy(), rtol=0, atol=1e-6)


def test_cfg_combine() -> None:
    rng = np.random.default_rng(1)
    uncond, cond = rng.standard_normal((2, 3, 5)).astype(np.float32)
    out = cfg_combine(uncond, cond, 3.0)
    np.testing.assert_allclose(out, uncond + 3.0 * (cond - uncond), rtol=1e-6)
    np.testing.assert_allclose(cfg_combine(uncond, cond, 1.0), cond, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(cfg_combine(uncond, cond, 0.0), uncond)
    assert out.dtype == np.float32


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_flow_sigmas_rejects_bad_steps(bad) -> None:
    with pytest.raises(ValueError, match="steps"):
        flow_sigmas(bad)


def _euler_reference(steps: int, spacing: str) -> EulerDiscreteScheduler:
    scheduler = EulerDiscreteScheduler(**{**DECODER_CONFIG, "timestep_spacing": spacing})
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 7, 50, 1000])
def test_euler_schedule_equals_diffusers(spacing: str, steps: int) -> None:
    ref = _euler_reference(steps, spacing)
    sched = euler_discrete_schedule(steps, timestep_spacing=spacing)
    assert sched.timesteps.dtype == np.float32 and sched.sigmas.dtype == np.float32
    assert sched.sigmas.shape == (steps + 1,) and sched.sigmas[-1] == 0
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
    # torch's SIMD linspace/sqrt differ from scalar float32 by an ulp or two: relative 1e-6.
    np.testing.assert_allclose(sched.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(sched.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)


def test_euler_leading_50_values() -> None:
    # Derived independently: leading spacing, ratio 1000 // 50 = 20, offset 1 -> 981, 961, ..., 1.
    sched = euler_discrete_schedule(50)
    np.testing.assert_array_equal(sched.timesteps, np.arange(981, 0, -20, dtype=np.float32))
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    sigma_981 = np.sqrt((1 - alphas_cumprod[981]) / alphas_cumprod[981])
    np.testing.assert_allclose(sched.sigmas[0], sigma_981, rtol=1e-4)
    np.testing.assert_allclose(sched.init_noise_sigma, np.sqrt(sigma_981**2 + 1), rtol=1e-4)


def test_euler_schedule_is_immutable() -> None:
    sched = euler_discrete_schedule(5)
    with pytest.raises(ValueError):
        sched.sigmas[0] = 1.0
    with pytest.raises(AttributeError):
        sched.init_noise_sigma = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("steps", [50, 3])
def test_euler_loop_equals_diffusers(steps: int) -> None:
    ref = _euler_reference(steps, "leading")
    sched = euler_discrete_schedule(steps)
    rng = np.random.default_rng(steps)
    noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    eps = rng.standard_normal((steps, 2, 4, 8, 8)).astype(np.float32)  # fixed "model outputs"

    x_ref = torch.from_numpy(noise) * ref.init_noise_sigma
    x = noise * np.float32(sched.init_noise_sigma)
    np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-6, atol=0)
    for i, t in enumerate(ref.timesteps):
        model_in_ref = ref.scale_model_input(x_ref, t)
        model_in = scale_model_input(x, sched.sigmas[i])
        np.testing.assert_allclose(model_in, model_in_ref.numpy(), rtol=1e-5, atol=1e-5)
        x_ref = ref.step(torch.from_numpy(eps[i]), t, x_ref).prev_sample
        x = euler_discrete_step(x, eps[i], sched.sigmas[i], sched.sigmas[i + 1])
        # Latents start at ~15 and end at ~1: absolute error relative to the start scale.
        np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(steps=0), "steps"),
        (dict(steps=1001), "steps"),
        (dict(steps=10, timestep_spacing="karras"), "timestep_spacing"),
        (dict(steps=10, beta_schedule="cosine"), "beta_schedule"),
    ],
)
def test_euler_schedule_rejects_bad_config(kwargs: dict, match: str) -> None:
    steps = kwargs.pop("steps")
    with pytest.raises(ValueError, match=match):
        euler_discrete_schedule(steps, **kwargs)


def test_module_imports_no_torch() -> None:
    forbidden = ("torch", "transformers", "diffusers")
    code = (
        f"import sys, runtime.jobs.schedule; sys.exit(any(m in sys.modules for m in {forbidden}))"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1]
    )
