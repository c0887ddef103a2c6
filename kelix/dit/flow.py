"""Rectified-flow (flow matching) math of the DiT: noising, target, timestep sampling.

Convention (SANA, SD3, diffusers' ``FlowMatchEulerDiscreteScheduler``): ``sigma`` runs from 0 (clean
latent ``x0``) to 1 (pure noise); ``x_t = (1 - sigma) * x0 + sigma * noise``; the network predicts the
velocity ``noise - x0``; it sees the timestep ``sigma * num_train_timesteps``.
"""

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class FlowConfig:
    """Training-time timestep distribution of flow matching.

    Args:
        shift: timestep shift ``sigma = shift * s / (1 + (shift - 1) * s)``; > 1 spends more steps at
            high noise, which high-resolution latents need (SANA, Kelix: 3). Sampling uses the same shift.
        weighting: ``logit_normal``: ``s = sigmoid(N(logit_mean, logit_std))`` (SD3); ``uniform``: ``s ~ U(0, 1)``.
        logit_mean: mean of the normal before the sigmoid.
        logit_std: standard deviation of the normal before the sigmoid.
        num_train_timesteps: the network's timestep input is ``sigma * num_train_timesteps`` (as in the
            diffusers scheduler, so a pretrained SANA sees the scale it was trained on).
        buckets: the loss is also logged per sigma bucket (``buckets`` equal-width bins of [0, 1]).
    """

    shift: float = 3.0
    weighting: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    num_train_timesteps: int = 1000
    buckets: int = 4

    def __post_init__(self):
        if not self.shift > 0:
            raise ValueError(f"flow.shift must be > 0, got {self.shift}")
        if not self.logit_std > 0:
            raise ValueError(f"flow.logit_std must be > 0, got {self.logit_std}")
        if self.weighting not in ("logit_normal", "uniform"):
            raise ValueError(f"flow.weighting {self.weighting!r} is not logit_normal or uniform")
        if self.buckets < 1:
            raise ValueError(f"flow.buckets must be >= 1, got {self.buckets}")


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift of SD3/SANA: identity at ``shift=1``; fixes 0 and 1."""
    return shift * s / (1 + (shift - 1) * s)


def sample_sigmas(n: int, cfg: FlowConfig, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` training noise levels in (0, 1), drawn per ``cfg`` then shifted. Float32, on ``device``.

    Drawn on the generator's device (CPU by default) and moved, so a seed gives the same draws everywhere.
    """
    gen_device = generator.device if generator is not None else "cpu"
    if cfg.weighting == "logit_normal":
        u = torch.randn(n, generator=generator, device=gen_device) * cfg.logit_std + cfg.logit_mean
        s = torch.sigmoid(u)
    else:
        s = torch.rand(n, generator=generator, device=gen_device)
    return shift_sigma(s, cfg.shift).to(device or gen_device)


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) * x0 + sigma * noise`` with one ``sigma`` per batch item."""
    s = _expand(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the network regresses: ``d x_t / d sigma = noise - x0``."""
    return noise - x0


def bucket_of(sigma: torch.Tensor, buckets: int) -> torch.Tensor:
    """Index of the equal-width sigma bucket of each item (sigma = 1 falls in the last one)."""
    return (sigma * buckets).long().clamp(0, buckets - 1)


def bucket_names(buckets: int) -> list[str]:
    """Log names of the buckets: ``loss_sigma_00_25`` ... (percent bounds)."""
    edges = [round(100 * i / buckets) for i in range(buckets + 1)]
    return [f"loss_sigma_{a:02d}_{b:02d}" if b < 100 else f"loss_sigma_{a:02d}_100" for a, b in zip(edges, edges[1:])]


def bucket_centers(buckets: int) -> torch.Tensor:
    """Middle sigma of each bucket: validation evaluates the loss at these fixed noise levels."""
    return (torch.arange(buckets, dtype=torch.float32) + 0.5) / buckets
