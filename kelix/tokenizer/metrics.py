"""Codebook health per sub-codebook: usage fraction, perplexity and dead codes (torchmetrics).

The official code divided usage by S = N*K although codes are per sub-codebook (0..K-1), so its
usage read at most 1/N. Here every statistic is per sub-codebook, over the counts accumulated since
the last reset (a window of steps), summed over ranks by torchmetrics.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class CodebookUsage(Metric):
    """Code counts ``[N, K]`` -> per-sub-codebook usage, perplexity and dead codes.

    Args:
        N: sub-codebooks.
        K: entries per sub-codebook.

    ``compute()`` returns a dict of ``[N]`` tensors: ``usage`` (codes used at least once / K),
    ``perplexity`` (exp of the entropy of the code distribution, in ``1..K``) and ``dead``
    (codes never used in the window), and ``counts [N, K]``. All come from the counts summed over
    ranks; after ``compute()`` the ``counts`` state holds this rank's counts again (torchmetrics
    restores the unsynced state), so read the summed histogram from the result.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, N: int, K: int, **kwargs):
        super().__init__(**kwargs)
        self.N, self.K = N, K
        self.add_state("counts", default=torch.zeros(N, K, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, codes: torch.Tensor) -> None:
        """Count codes ``[..., N]`` (each in ``0..K-1`` of its sub-codebook)."""
        codes = codes.reshape(-1, self.N).long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.K):
            raise ValueError(f"codes must be in 0..{self.K - 1}, got {int(codes.min())}..{int(codes.max())}")
        flat = codes + torch.arange(self.N, device=codes.device) * self.K
        self.counts += torch.bincount(flat.reshape(-1), minlength=self.N * self.K).view(self.N, self.K)

    def compute(self) -> dict[str, torch.Tensor]:
        counts = self.counts.double()
        total = counts.sum(-1, keepdim=True)
        p = counts / total.clamp(min=1)
        entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
        used = (self.counts > 0).sum(-1)
        return {
            "usage": (used.double() / self.K).float(),
            "perplexity": entropy.exp().float(),
            "dead": (self.K - used).float(),
            "counts": self.counts.clone(),
        }
