"""Gradient clipping: by global norm (default) or by value per element (the official scripts' --clip-range)."""

import pytest
import torch

from kelix.training.module import KelixModule
from kelix.training.optim import OptimConfig


class Tiny(KelixModule):
    def __init__(self, **optim):
        super().__init__(optim=OptimConfig(**optim))
        self.w = torch.nn.Parameter(torch.zeros(4))
        self.logged = {}

    def log(self, name, value, **kw):
        self.logged[name] = float(value)


def clip(module, grad, **kw):
    module.w.grad = torch.tensor(grad)
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    module.configure_gradient_clipping(opt, **kw)
    return module.w.grad.tolist(), module.logged["train/grad_norm"]


G = [3.0, -4.0, 0.5, 0.0]  # norm 5.0249...
NORM = (9 + 16 + 0.25) ** 0.5


def test_by_value_clamps_each_element_and_logs_the_norm_before():
    grad, norm = clip(Tiny(grad_clip=1.0, grad_clip_algorithm="value"), G)
    assert grad == [1.0, -1.0, 0.5, 0.0] and norm == pytest.approx(NORM)


def test_by_norm_scales_the_whole_gradient():
    grad, norm = clip(Tiny(grad_clip=1.0), G)
    assert grad == pytest.approx([g / NORM for g in G], rel=1e-5) and norm == pytest.approx(NORM)


def test_the_trainers_algorithm_wins_and_no_threshold_clips_nothing():
    from lightning.pytorch.utilities import GradClipAlgorithmType

    grad, _ = clip(Tiny(grad_clip=2.0), G, gradient_clip_algorithm=GradClipAlgorithmType.VALUE)
    assert grad == [2.0, -2.0, 0.5, 0.0]
    grad, norm = clip(Tiny(grad_clip_algorithm="value"), G)
    assert grad == G and norm == pytest.approx(NORM)
