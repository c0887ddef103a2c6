"""Tiny DiT pieces shared by the DiT tests."""

import pytest
import torch

TINY_SANA = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                 num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                 caption_channels=16, sample_size=8)
COND_DIM = 12


def tiny_config(**kw):
    from kelix.dit.model import DiTConfig

    return DiTConfig(cond_dim=COND_DIM, transformer=dict(TINY_SANA), **kw)


def tiny_dit(seed: int = 0, **kw):
    from kelix.dit.model import KelixDiT

    torch.manual_seed(seed)
    return KelixDiT(tiny_config(**kw)).eval()


def tiny_module(**kw):
    from kelix.dit.conditions import PromptBytesConditions
    from kelix.dit.module import DiTModule

    torch.manual_seed(0)
    kw.setdefault("sample_every_n_steps", 0)
    return DiTModule(dit=tiny_config(), condition=PromptBytesConditions(COND_DIM), **kw)


@pytest.fixture
def dit():
    return tiny_dit()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster and immune to the busy-waiting of idle OpenMP threads
    on a shared machine; restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
