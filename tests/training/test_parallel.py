"""Activation checkpointing keeps names, outputs and gradients; FSDP2Strategy is data-parallel only."""

import pytest
import torch

from kelix.hf import TINY_QWEN3, load_causal_lm
from kelix.training.parallel import FSDP2Strategy, apply_activation_checkpointing, is_checkpointed


def test_activation_checkpointing_keeps_names_outputs_and_gradients():
    """Same loss and gradients, and the blocks really are recomputed in backward."""
    torch.manual_seed(0)
    plain = load_causal_lm(config=TINY_QWEN3)
    wrapped = load_causal_lm(config=TINY_QWEN3)
    wrapped.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(wrapped, list(wrapped.model.layers)) == 2
    assert apply_activation_checkpointing(wrapped, list(wrapped.model.layers)) == 0  # idempotent
    assert all(is_checkpointed(b) for b in wrapped.model.layers) and not is_checkpointed(plain.model.layers[0])
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]  # nothing renamed
    ids = torch.randint(0, 256, (2, 12))
    losses, grads, calls = [], [], []
    for m in (plain, wrapped):
        act, n = m.model.layers[0].mlp.act_fn, []
        act.forward = lambda x, f=act.forward, n=n: n.append(1) or f(x)
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({k: p.grad for k, p in m.named_parameters()})
        calls.append(len(n))
    assert calls == [1, 2]  # forward, and the recomputation in backward
    assert torch.allclose(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-6), n


def test_activation_checkpointing_rejects_foreign_blocks():
    model = load_causal_lm(config=TINY_QWEN3)
    with pytest.raises(ValueError, match="1 of 1 parallel_blocks\\(\\) are not submodules"):
        apply_activation_checkpointing(model, [torch.nn.Linear(2, 2)])


def test_fsdp2_strategy_is_pure_data_parallel():
    s = FSDP2Strategy(tensor_parallel_size="auto")
    assert s._tensor_parallel_size == 1 and s._data_parallel_size == "auto"
    with pytest.raises(ValueError, match="tensor_parallel_size must be 1, got 2"):
        FSDP2Strategy(tensor_parallel_size=2)
