"""Condition states -> latents -> image: Euler sampling of the flow with diffusers' scheduler, plus CFG.

``cfg_scale == 1`` runs the conditional branch alone (no unconditional forward at all); otherwise the
conditional and unconditional (learned null condition) inputs go through the DiT as one batch and
``v = v_uncond + cfg_scale * (v_cond - v_uncond)``.

Two sigma schedules: ``default`` is diffusers' ``set_timesteps(steps)`` (this kit's training and
samples); ``linspace`` is the released Kelix-DiT's (``sigmas = linspace(1, 1/steps, steps)`` before the
shift). :data:`RELEASE_SAMPLING` holds the release's whole sampler (50 steps, shift 3, guidance 1).
"""

import numpy as np
import torch
from torch import nn

SIGMA_SCHEDULES = ("default", "linspace")
# the released Kelix-DiT's sampler (its demo: kelix_utils.py), as keyword arguments of sample_latents/generate
RELEASE_SAMPLING = dict(steps=50, cfg_scale=1.0, shift=3.0, sigma_schedule="linspace")


def make_scheduler(shift: float = 3.0, num_train_timesteps: int = 1000):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` with the training shift (stateful: one per sampling run)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)


def set_schedule(scheduler, steps: int, sigma_schedule: str = "default", device=None) -> None:
    """Give ``scheduler`` its ``steps`` timesteps (see the module docstring for the schedules)."""
    if sigma_schedule == "default":
        scheduler.set_timesteps(steps, device=device)
    elif sigma_schedule == "linspace":
        scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1.0 / steps, steps), device=device)
    else:
        raise ValueError(f"sigma_schedule {sigma_schedule!r} is not one of {', '.join(SIGMA_SCHEDULES)}")


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Starting noise drawn on the CPU from ``seed``: the same image on every device and machine."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=g).to(device)


@torch.no_grad()
def sample_latents(dit: nn.Module, states: torch.Tensor, mask: torch.Tensor | None = None, *,
                   latent_size: tuple[int, int], steps: int = 20, cfg_scale: float = 4.5, shift: float = 3.0,
                   seed: int = 0, noise: torch.Tensor | None = None, num_train_timesteps: int = 1000,
                   sigma_schedule: str = "default") -> torch.Tensor:
    """Integrate the flow from noise (sigma 1) to a latent (sigma 0) with ``steps`` Euler steps.

    Args:
        dit: a :class:`~kelix.dit.model.KelixDiT` (called as ``dit(x, timestep, states, mask, drop)``).
        states: condition states ``[B, L, D]``; mask: ``[B, L]`` bool (True = real state).
        latent_size: ``(h, w)`` of the latent grid (image size / VAE downsampling).
        steps: number of Euler steps (any positive number).
        cfg_scale: classifier-free guidance scale; 1 disables guidance and its unconditional forward.
        shift: timestep shift of the schedule (the training value, 3 for Kelix/SANA).
        seed: seed of the starting noise (ignored when ``noise`` is given).
        noise: starting noise ``[B, C, h, w]``.
        num_train_timesteps: the training ``flow.num_train_timesteps`` (the network's timestep is
            ``sigma * num_train_timesteps``, as in training).
        sigma_schedule: ``default`` or ``linspace`` (the release's; see the module docstring).
    Returns:
        latents ``[B, C, h, w]`` (float32), to decode with the VAE.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if sigma_schedule not in SIGMA_SCHEDULES:
        raise ValueError(f"sigma_schedule {sigma_schedule!r} is not one of {', '.join(SIGMA_SCHEDULES)}")
    b, device = states.shape[0], states.device
    channels = dit.latent_channels if hasattr(dit, "latent_channels") else dit.config.transformer["in_channels"]
    if noise is None:
        noise = initial_noise((b, channels, *latent_size), seed, device)
    if mask is None:
        mask = torch.ones(states.shape[:2], dtype=torch.bool, device=device)
    scheduler = make_scheduler(shift, num_train_timesteps)
    set_schedule(scheduler, steps, sigma_schedule, device)
    guided = cfg_scale != 1.0
    if guided:
        states2, mask2 = torch.cat([states, states]), torch.cat([mask, mask])
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(device)
    x = noise.float()
    for t in scheduler.timesteps:
        if guided:
            v = dit(torch.cat([x, x]), t.expand(2 * b), states2, mask2, drop).float()
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        else:
            v = dit(x, t.expand(b), states, mask).float()
        x = scheduler.step(v, t, x, return_dict=False)[0].float()
    return x


@torch.no_grad()
def generate(dit: nn.Module, vae, states: torch.Tensor, mask: torch.Tensor | None = None, *,
             image_size: tuple[int, int] | int = 1024, steps: int = 20, cfg_scale: float = 4.5, shift: float = 3.0,
             seed: int = 0, num_train_timesteps: int = 1000, sigma_schedule: str = "default") -> torch.Tensor:
    """Condition states -> images ``[B, 3, H, W]`` in ``[-1, 1]`` (see :func:`sample_latents`).

    Args:
        vae: a :class:`~kelix.dit.vae.FrozenVAE` (its ``downsample`` gives the latent size).
        image_size: output ``(H, W)`` or a square side; multiples of the VAE's downsampling.
        shift, num_train_timesteps: the training flow's (``FlowConfig``; an export's ``flow.json``).
        sigma_schedule: ``default`` or ``linspace`` (the release's).
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h % vae.downsample or w % vae.downsample:
        raise ValueError(f"image_size {h}x{w} is not a multiple of the VAE's downsampling {vae.downsample}")
    latents = sample_latents(dit, states, mask, latent_size=(h // vae.downsample, w // vae.downsample), steps=steps,
                             cfg_scale=cfg_scale, shift=shift, seed=seed, num_train_timesteps=num_train_timesteps,
                             sigma_schedule=sigma_schedule)
    return vae.decode(latents)


def image_grid(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of images ``[n, 3, H, W]`` in ``[-1, 1]`` -> one ``[3, rows * H, n * W]`` image in ``[0, 1]``."""
    return torch.cat([torch.cat(list(r.float().cpu()), dim=2) for r in rows], dim=1).add(1).div(2).clamp(0, 1)
