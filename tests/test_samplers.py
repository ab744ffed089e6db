"""The sampler plans (runtime.jobs.samplers) replayed in numpy equal diffusers' schedulers step
by step.

The replay computes exactly what the fused step graphs compute from a plan's coefficients; the
model is a fixed nonlinear function of the sample and the timestep, so a wrong coefficient, a
wrong order switch or a wrong timestep shows at once.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    LMSDiscreteScheduler,
)

from runtime.errors import UserError
from runtime.jobs import samplers
from runtime.jobs.schedule import dpm_solver_schedule, flow_sigmas

DECODER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    timestep_spacing="leading",
    steps_offset=1,
)


def eps_model(x, t):
    return np.tanh(0.8 * x + np.float32(t) / 1000.0).astype(np.float32) - 0.1 * x


def velocity_model(x, t):
    return (np.sin(1.3 * x) + np.float32(t) / 500.0 - x).astype(np.float32)


def replay_unet(plan, noise):
    x = (noise * np.float32(plan.init_noise_sigma)).astype(np.float32)
    prev = np.zeros_like(x)
    for call in plan.calls:
        eps = eps_model(x * np.float32(call.in_scale), call.timestep)
        denoised = np.float32(call.d_sample) * x + np.float32(call.d_eps) * eps
        x = (
            np.float32(call.c_sample) * x
            + np.float32(call.c_eps) * eps
            + np.float32(call.c_prev) * prev
        )
        prev = denoised
    return x


def diffusers_unet(scheduler, steps, noise):
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(noise) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        eps = torch.from_numpy(eps_model(model_in.numpy(), float(t)))
        x = scheduler.step(eps, t, x).prev_sample
    return x.numpy()


def euler_config(**over):
    return EulerDiscreteScheduler(**{**DECODER, **over}).config


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
def test_dpm_schedule_equals_diffusers(spacing, steps):
    ref = DPMSolverMultistepScheduler.from_config(euler_config(timestep_spacing=spacing))
    ref.set_timesteps(steps)
    ours = dpm_solver_schedule(steps, **{**DECODER, "timestep_spacing": spacing})
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32))
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20])
def test_dpmpp_2m_equals_diffusers(spacing, steps):
    noise = np.random.default_rng(steps).standard_normal((2, 4, 6, 6), dtype=np.float32)
    config = euler_config(timestep_spacing=spacing)
    ref = DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2
    )
    want = diffusers_unet(ref, steps, noise)
    plan = samplers.decoder_plan("dpmpp_2m", steps, {**DECODER, "timestep_spacing": spacing})
    assert len(plan.calls) == steps and samplers.forwards(plan) == 2 * steps
    np.testing.assert_allclose(replay_unet(plan, noise), want, rtol=1e-4, atol=1e-4)


def test_dpmpp_2m_is_second_order_between_the_ends():
    plan = samplers.decoder_plan("dpmpp_2m", 10, DECODER)
    orders = [call.c_prev != 0 for call in plan.calls]
    assert orders == [False] + [True] * 8 + [False]
    last = plan.calls[-1]  # into sigma 0: the result is the x0 prediction itself
    assert (last.c_sample, last.c_eps) == pytest.approx((last.d_sample, last.d_eps))


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_euler_plan_equals_diffusers(steps):
    noise = np.random.default_rng(0).standard_normal((1, 4, 5, 5), dtype=np.float32)
    want = diffusers_unet(EulerDiscreteScheduler.from_config(euler_config()), steps, noise)
    plan = samplers.decoder_plan("euler", steps, DECODER)
    np.testing.assert_allclose(replay_unet(plan, noise), want, rtol=1e-5, atol=1e-5)


def replay_flow(plan, noise):
    x, prev = noise.copy(), np.zeros_like(noise)
    for call in plan.calls:
        v = velocity_model(x, call.timestep)
        x = x + np.float32(call.c_velocity) * v + np.float32(call.c_prev) * prev
        prev = v
    return x


@pytest.mark.parametrize("steps", [1, 2, 5, 15])
def test_heun_equals_diffusers_on_blip3o_sigmas(steps):
    """diffusers' FlowMatchHeun update, its sigmas replaced by BLIP3-o's and its model fed the
    DiT's truncated integer timestep."""
    noise = np.random.default_rng(1).standard_normal((2, 3, 4, 4), dtype=np.float32)
    ref = FlowMatchHeunDiscreteScheduler()
    ref.set_timesteps(steps)
    sigmas = torch.from_numpy(flow_sigmas(steps))
    ref.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    ts = sigmas[:-1] * 1000
    ref.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
    x = torch.from_numpy(noise)
    for t in ref.timesteps:
        v = torch.from_numpy(velocity_model(x.numpy(), int(np.trunc(t.numpy()))))
        x = ref.step(v, t, x).prev_sample
    plan = samplers.flow_plan("heun", steps)
    assert len(plan.calls) == 2 * steps - 1
    np.testing.assert_allclose(replay_flow(plan, noise), x.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 6, 15])
def test_lms_equals_diffusers_at_order_2_on_blip3o_sigmas(steps):
    """diffusers' LMSDiscreteScheduler (order 2) on the flow ODE: its epsilon-form derivative
    (sample - (sample - sigma out)) / sigma is the model output, here the velocity."""
    noise = np.random.default_rng(3).standard_normal((2, 3, 4, 4), dtype=np.float32)
    ref = LMSDiscreteScheduler()
    ref.set_timesteps(steps)
    sigmas = flow_sigmas(steps)
    ref.sigmas = torch.from_numpy(sigmas)
    ref.timesteps = torch.from_numpy(sigmas[:-1] * 1000)
    x = torch.from_numpy(noise)
    for t, sigma in zip(ref.timesteps, sigmas):
        v = velocity_model(x.numpy(), int(np.trunc(np.float32(sigma) * np.float32(1000))))
        x = ref.step(torch.from_numpy(v), t, x, order=2).prev_sample
    plan = samplers.flow_plan("lms", steps)
    assert len(plan.calls) == steps and all(c.c_prev == 0 for c in plan.calls[:1])
    np.testing.assert_allclose(replay_flow(plan, noise), x.numpy(), rtol=1e-4, atol=1e-4)


def test_flow_euler_plan_is_blip3os_sampler():
    from runtime.jobs.schedule import flow_euler_step, flow_timesteps

    noise = np.random.default_rng(2).standard_normal((1, 3, 4, 4), dtype=np.float32)
    sigmas = flow_sigmas(30)
    x = noise
    for i, t in enumerate(flow_timesteps(sigmas)):
        x = flow_euler_step(x, velocity_model(x, t), sigmas[i], sigmas[i + 1])
    plan = samplers.flow_plan("euler", 30)
    np.testing.assert_array_equal(replay_flow(plan, noise), x)


def test_unknown_sampler_is_one_clear_error():
    with pytest.raises(
        UserError, match=r"^decoder_sampler must be one of euler, dpmpp_2m, got 'ddim'"
    ):
        samplers.decoder_plan("ddim", 10, DECODER)
    with pytest.raises(UserError, match=r"^sampler must be one of euler, heun, lms, got 'rk4'$"):
        samplers.flow_plan("rk4", 10)
