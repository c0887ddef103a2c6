"""Flow-matching math: noising, target, shifted logit-normal timesteps, buckets; parity with diffusers' shift."""

import math

import pytest
import torch

from kelix.dit.flow import (
    FlowConfig,
    add_noise,
    bucket_centers,
    bucket_names,
    bucket_of,
    sample_sigmas,
    shift_sigma,
    velocity_target,
)


def test_noising_and_target_on_known_values():
    x0 = torch.tensor([[[[2.0]]], [[[4.0]]]])
    noise = torch.tensor([[[[-1.0]]], [[[0.0]]]])
    sigma = torch.tensor([0.25, 1.0])
    assert add_noise(x0, noise, sigma).flatten().tolist() == [0.75 * 2 - 0.25, 0.0]
    assert velocity_target(x0, noise).flatten().tolist() == [-3.0, -4.0]
    assert torch.equal(add_noise(x0, noise, torch.zeros(2)), x0)


def test_shift_formula_and_fixed_points():
    s = torch.tensor([0.0, 0.5, 0.25, 1.0])
    assert torch.allclose(shift_sigma(s, 3.0), torch.tensor([0.0, 0.75, 0.5, 1.0]))
    assert torch.equal(shift_sigma(s, 1.0), s)


def test_logit_normal_sampling_is_sigmoid_of_normal_then_shifted():
    cfg = FlowConfig(shift=3.0, logit_mean=0.5, logit_std=2.0)
    got = sample_sigmas(6, cfg, generator=torch.Generator().manual_seed(7))
    u = torch.randn(6, generator=torch.Generator().manual_seed(7)) * 2.0 + 0.5
    s = 1 / (1 + torch.exp(-u))
    assert torch.allclose(got, 3 * s / (1 + 2 * s))
    assert ((got > 0) & (got < 1)).all()
    # the shift moves mass to high noise: median sigma = shift(0.5) = 0.75 with mean 0
    many = sample_sigmas(20000, FlowConfig(), generator=torch.Generator().manual_seed(0))
    assert abs(many.median().item() - 0.75) < 0.01


def test_uniform_weighting():
    got = sample_sigmas(5, FlowConfig(shift=1.0, weighting="uniform"), generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, torch.rand(5, generator=torch.Generator().manual_seed(3)))


def test_training_shift_matches_the_diffusers_sampling_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    shifted = FlowMatchEulerDiscreteScheduler(shift=3.0)
    shifted.set_timesteps(8)
    # diffusers spaces the steps evenly before the shift (down to its shifted sigma_min), then shifts
    unshifted = torch.linspace(1.0, shifted.sigma_min, 8)
    assert torch.allclose(shifted.sigmas[:-1].float(), shift_sigma(unshifted, 3.0), atol=1e-6)
    assert torch.allclose(shifted.timesteps.float(), shifted.sigmas[:-1].float() * 1000, atol=1e-3)


def test_buckets():
    assert bucket_names(4) == ["loss_sigma_00_25", "loss_sigma_25_50", "loss_sigma_50_75", "loss_sigma_75_100"]
    assert bucket_of(torch.tensor([0.0, 0.24, 0.25, 0.99, 1.0]), 4).tolist() == [0, 0, 1, 3, 3]
    assert bucket_centers(4).tolist() == [0.125, 0.375, 0.625, 0.875]
    assert math.isclose(bucket_centers(1).item(), 0.5)


@pytest.mark.parametrize("kw,msg", [({"shift": 0}, "shift must be > 0"), ({"logit_std": 0}, "logit_std"),
                                    ({"weighting": "cosine"}, "weighting"), ({"buckets": 0}, "buckets")])
def test_bad_config_fails_with_the_field(kw, msg):
    with pytest.raises(ValueError, match=msg):
        FlowConfig(**kw)
