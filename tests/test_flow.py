"""Flow matching functions against diffusers' FlowMatchEulerDiscreteScheduler (shift 1)."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from training import flow


def _reference_scheduler(steps):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    return scheduler


@pytest.mark.parametrize("steps", [1, 2, 10, 30])
def test_schedule_matches_diffusers(steps):
    ref = _reference_scheduler(steps)
    sigmas = flow.sigma_schedule(steps)
    torch.testing.assert_close(sigmas, ref.sigmas.float())
    assert torch.equal(flow.timesteps_for(sigmas), ref.timesteps.to(torch.long))


def test_thirty_step_timesteps_are_blip3o_integers():
    t = flow.timesteps_for(flow.sigma_schedule(30))
    assert t[0] == 1000 and t[-1] == 33 and t.dtype == torch.long


def test_euler_loop_matches_diffusers():
    steps = 5
    ref = _reference_scheduler(steps)
    sigmas = flow.sigma_schedule(steps)
    gen = torch.Generator().manual_seed(0)
    x_ref = x = torch.randn(2, 4, 8, 8, generator=gen)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(x.shape, generator=gen)
        x_ref = ref.step(v, t, x_ref).prev_sample
        x = flow.euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
    torch.testing.assert_close(x, x_ref)


def test_sample_features_batches_uncond_first_and_applies_cfg():
    seen = []

    def velocity(x, t, cond):
        seen.append((t.clone(), cond.clone()))
        return cond.mean(dim=(1, 2)).view(-1, 1, 1, 1) * torch.ones_like(x)

    cond = torch.ones(1, 64, 8)
    out = flow.sample_features(velocity, cond, torch.zeros(1, 3, 8, 8), steps=2, guidance=3.0)
    t0, c0 = seen[0]
    assert t0.tolist() == [1000, 1000]
    assert c0[0].abs().sum() == 0 and torch.equal(c0[1], cond[0])
    # v_uncond = 0, v_cond = 1 -> guided v = 3; Euler from sigma 1 to 0 moves x by -3
    torch.testing.assert_close(out, torch.full((1, 3, 8, 8), -3.0))


def test_training_sigmas_are_the_1000_levels():
    s = flow.sample_training_sigmas(20000, torch.Generator().manual_seed(0))
    levels = (s * 1000).round()
    assert torch.allclose(s * 1000, levels) and levels.min() >= 1 and levels.max() <= 1000
    assert len(torch.unique(levels)) > 990


def test_conditioning_dropout_rate():
    cond = torch.ones(20000, 2, 2)
    dropped = flow.drop_conditioning(cond, 0.1, torch.Generator().manual_seed(0))
    rate = (dropped.sum(dim=(1, 2)) == 0).float().mean().item()
    assert 0.09 < rate < 0.11


def test_loss_target_is_noise_minus_data():
    x0 = torch.randn(4, 3, 8, 8)
    cond = torch.randn(4, 64, 8)

    def perfect(x_t, t, c):  # knows eps and x0 through the closure: v = eps - x0
        sigma = (t / 1000).view(-1, 1, 1, 1)
        eps = (x_t - (1 - sigma) * x0) / sigma
        return eps - x0

    loss = flow.flow_matching_loss(perfect, x0, cond, generator=torch.Generator().manual_seed(1))
    assert loss.item() < 1e-8


def test_host_noise_is_seeded_and_validated():
    a, b = flow.host_noise(7, (2, 3), (4,))
    a2, b2 = flow.host_noise(7, (2, 3), (4,))
    assert torch.equal(a, a2) and torch.equal(b, b2) and a.dtype == torch.float32
    np.testing.assert_array_equal(
        a.numpy(), np.random.default_rng(7).standard_normal((2, 3), dtype=np.float32)
    )
    with pytest.raises(ValueError, match="seed"):
        flow.host_noise(-1, (1,))
    with pytest.raises(TypeError, match="seed"):
        flow.host_noise(1.5, (1,))
    with pytest.raises(ValueError, match="steps"):
        flow.sigma_schedule(0)


def test_logit_normal_sigmas_weigh_the_middle():
    s = flow.sample_training_sigmas(20000, torch.Generator().manual_seed(0), "logit_normal")
    assert s.min() > 0 and s.max() < 1
    assert abs(float(s.median()) - 0.5) < 0.02
    middle = ((s > 0.25) & (s < 0.75)).float().mean()
    assert middle > 0.6  # uniform: 0.5
    with pytest.raises(ValueError, match="logit_normal"):
        flow.sample_training_sigmas(4, None, "cosine")
