"""Sampler: fixed-seed determinism, any number of steps, CFG 1 = the conditional branch alone (no
unconditional forward), CFG > 1 = the guidance formula, Euler steps = diffusers' scheduler."""

import pytest
import torch

from kelix.dit.sampler import generate, image_grid, make_scheduler, sample_latents
from kelix.dit.vae import VAEConfig, load_vae
from tests.dit.conftest import COND_DIM


class Counting(torch.nn.Module):
    """Records the batch size and drop flags of every DiT call."""

    def __init__(self, dit):
        super().__init__()
        self.dit, self.calls = dit, []

    @property
    def latent_channels(self):
        return self.dit.latent_channels

    def forward(self, x, t, states, mask=None, drop=None):
        self.calls.append((x.shape[0], None if drop is None else drop.tolist()))
        return self.dit(x, t, states, mask, drop)


def cond(b=2, length=5):
    states = torch.randn(b, length, COND_DIM, generator=torch.Generator().manual_seed(1))
    mask = torch.arange(length)[None] < torch.tensor([5, 2])[:, None]
    return states, mask


def test_fixed_seed_is_deterministic(dit):
    states, mask = cond()
    a = sample_latents(dit, states, mask, latent_size=(8, 8), steps=3, cfg_scale=2.0, seed=5)
    b = sample_latents(dit, states, mask, latent_size=(8, 8), steps=3, cfg_scale=2.0, seed=5)
    c = sample_latents(dit, states, mask, latent_size=(8, 8), steps=3, cfg_scale=2.0, seed=6)
    assert a.shape == (2, 4, 8, 8) and torch.equal(a, b) and not torch.allclose(a, c)


def test_cfg_one_runs_only_the_conditional_branch_with_plain_euler_steps(dit):
    states, mask = cond()
    wrapped = Counting(dit)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sample_latents(wrapped, states, mask, latent_size=(8, 8), steps=4, cfg_scale=1.0, noise=noise)
    assert wrapped.calls == [(2, None)] * 4  # 4 steps, batch 2, never the null condition
    sched = make_scheduler(3.0)
    sched.set_timesteps(4)
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):  # Euler: x += (sigma_next - sigma) * v
        x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * dit(x, t.expand(2), states, mask)
    assert torch.allclose(out, x, atol=1e-5)


def test_cfg_combines_the_conditional_and_null_branches(dit):
    states, mask = cond()
    wrapped = Counting(dit)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sample_latents(wrapped, states, mask, latent_size=(8, 8), steps=2, cfg_scale=3.0, noise=noise)
    assert wrapped.calls == [(4, [False, False, True, True])] * 2
    sched = make_scheduler(3.0)
    sched.set_timesteps(2)
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        vc = dit(x, t.expand(2), states, mask)
        vu = dit(x, t.expand(2), states, mask, drop=torch.ones(2, dtype=torch.bool))
        x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * (vu + 3.0 * (vc - vu))
    assert torch.allclose(out, x, atol=1e-5)


def test_any_number_of_steps_and_images_in_range(dit):
    states, mask = cond()
    vae = load_vae(VAEConfig())
    for steps in (1, 7):
        wrapped = Counting(dit)
        img = generate(wrapped, vae, states, mask, image_size=32, steps=steps, cfg_scale=1.0)
        assert len(wrapped.calls) == steps
    assert img.shape == (2, 3, 32, 32) and img.min() >= -1 and img.max() <= 1
    grid = image_grid([img, img])
    assert grid.shape == (3, 64, 64) and 0 <= grid.min() and grid.max() <= 1


def test_sampling_feeds_the_transformer_the_timesteps_training_uses(monkeypatch):
    """num_train_timesteps (flow) and SANA's timestep_scale: for the same sigma, the transformer gets the same
    timestep in a training step and in sampling (an exported de-tokenizer), = sigma * N * timestep_scale as
    diffusers' SanaPipeline feeds a SANA transformer."""
    import kelix.dit.module as module
    from kelix.dit.conditions import PromptBytesConditions
    from kelix.dit.export import DeTokenizer
    from kelix.dit.flow import FlowConfig
    from kelix.dit.model import DiTConfig
    from kelix.dit.module import DiTModule
    from tests.dit.conftest import TINY_SANA

    flow = FlowConfig(num_train_timesteps=500, shift=2.0)
    torch.manual_seed(0)
    m = DiTModule(dit=DiTConfig(cond_dim=COND_DIM, transformer=dict(TINY_SANA, timestep_scale=0.25)), flow=flow,
                  condition=PromptBytesConditions(COND_DIM), cond_dropout=0.0, sample_every_n_steps=0)
    seen = []
    m.dit.transformer.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["timestep"].clone()),
                                                with_kwargs=True)
    det = DeTokenizer(m.dit, load_vae(VAEConfig()), flow)
    det.generate(torch.randn(1, 3, COND_DIM), image_size=16, steps=3, cfg_scale=1.0)
    sampled = torch.cat(seen)
    sched = make_scheduler(2.0, 500)
    sched.set_timesteps(3)
    sigmas = sched.sigmas[:3].float()  # the noise level of each sampling step
    seen.clear()
    monkeypatch.setattr(module, "sample_sigmas", lambda n, cfg, generator=None: sigmas[:n])
    batch = {"latents": torch.randn(3, 4, 4, 4), "prompts": ["a", "bb", "ccc"], "batch_size": 3}
    m.step(batch, "train")
    trained = seen[0]
    assert sampled.shape == trained.shape == (3,)
    assert torch.allclose(sampled, trained, rtol=1e-6)
    assert torch.allclose(trained, sigmas * 500 * 0.25, rtol=1e-6)


def test_release_schedule_is_shifted_linspace_sigmas():
    """sigma_schedule='linspace': sigmas linspace(1, 1/steps, steps), shifted by 3, then a final 0."""
    from kelix.dit.sampler import RELEASE_SAMPLING, set_schedule

    assert RELEASE_SAMPLING == dict(steps=50, cfg_scale=1.0, shift=3.0, sigma_schedule="linspace")
    sched = make_scheduler(3.0, 1000)
    set_schedule(sched, 5, "linspace")
    # by hand: s = 1, .8, .6, .4, .2 -> 3s / (1 + 2s)
    want = [1.0, 2.4 / 2.6, 1.8 / 2.2, 1.2 / 1.8, 0.6 / 1.4, 0.0]
    torch.testing.assert_close(sched.sigmas, torch.tensor(want), rtol=0, atol=1e-6)
    torch.testing.assert_close(sched.timesteps, torch.tensor(want[:-1]) * 1000, rtol=0, atol=1e-3)


def test_release_sampler_calls_the_dit_at_its_timesteps_and_steps_euler(dit):
    """A constant velocity v moves x by (0 - 1) * v in total; the DiT sees the schedule's timesteps."""
    seen = []

    class Constant(torch.nn.Module):
        latent_channels = 4

        def forward(self, x, t, states, mask=None, drop=None):
            seen.append((t.tolist(), drop))
            return torch.ones_like(x)

    states, mask = cond()
    noise = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    out = sample_latents(Constant(), states, mask, latent_size=(2, 2), steps=4, cfg_scale=1.0, noise=noise,
                         sigma_schedule="linspace")
    torch.testing.assert_close(out, noise - 1, rtol=0, atol=1e-6)
    # s = 1, .75, .5, .25 -> 3s / (1 + 2s) = 1, .9, .75, .5; no unconditional branch at guidance 1
    assert [t for t, _ in seen] == [[1000.0] * 2, [900.0] * 2, [750.0] * 2, [500.0] * 2]
    assert all(d is None for _, d in seen)
    with pytest.raises(ValueError, match="sigma_schedule 'cosine'"):
        sample_latents(Constant(), states, mask, latent_size=(2, 2), steps=4, sigma_schedule="cosine")
def test_the_sampling_schedule_is_shifted_as_training_shifts_sigma():
    # diffusers spaces the sigmas evenly from 1 down to its shifted sigma_min (1/num_train_timesteps shifted),
    # then applies the training shift
    from kelix.dit.flow import shift_sigma

    sched = make_scheduler(shift=3.0, num_train_timesteps=1000)
    sched.set_timesteps(4)
    want = shift_sigma(torch.linspace(1.0, float(shift_sigma(torch.tensor(1e-3), 3.0)), 4), 3.0)
    torch.testing.assert_close(sched.sigmas[:4].float(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(sched.timesteps.float(), want * 1000, rtol=0, atol=1e-2)
