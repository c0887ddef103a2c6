"""Activation checkpointing keeps names, outputs and gradients; FSDP2Strategy is data-parallel only."""

import pytest
import torch

from kelix.hf import TINY_QWEN3, load_causal_lm
from kelix.training.parallel import FSDP2Strategy, apply_activation_checkpointing, is_checkpointed


def run(model, ids, mask):
    """Loss, gradients and how many times each layer's MLP activation ran in one forward + backward."""
    calls = [[], []]
    for layer, c in zip(model.model.layers, calls):
        layer.mlp.act_fn.forward = lambda x, f=layer.mlp.act_fn.forward, c=c: c.append(1) or f(x)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)  # HF builds a KV cache by default
    out.loss.backward()
    return out.loss.detach(), {k: p.grad for k, p in model.named_parameters()}, [len(c) for c in calls]


def test_activation_checkpointing_keeps_names_outputs_and_gradients():
    """An HF layer and a plain module: same loss and gradients, nothing renamed, and really recomputed."""
    torch.manual_seed(0)
    plain = load_causal_lm(config=TINY_QWEN3)
    ac = load_causal_lm(config=TINY_QWEN3)
    ac.load_state_dict(plain.state_dict())
    blocks = [ac.model.layers[0], ac.model.layers[1].mlp]
    assert apply_activation_checkpointing(ac, blocks[:1]) == 1
    assert apply_activation_checkpointing(ac, blocks) == 1  # idempotent: only the new one
    assert all(is_checkpointed(b) for b in blocks) and not is_checkpointed(plain.model.layers[0])
    assert [n for n, _ in ac.named_parameters()] == [n for n, _ in plain.named_parameters()]
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # padding: a KV cache doubled by the recomputation would not even broadcast
    want, got = run(plain, ids, mask), run(ac, ids, mask)
    assert (want[2], got[2]) == ([1, 1], [2, 2])  # forward, and the recomputation in backward
    assert torch.allclose(want[0], got[0])
    assert want[1].keys() == got[1].keys()
    for n, g in want[1].items():
        assert torch.allclose(g, got[1][n], atol=1e-6), n


def test_activation_checkpointing_rejects_foreign_blocks():
    model = load_causal_lm(config=TINY_QWEN3)
    with pytest.raises(ValueError, match="1 of 1 parallel_blocks\\(\\) are not submodules"):
        apply_activation_checkpointing(model, [torch.nn.Linear(2, 2)])


def test_fsdp2_strategy_is_pure_data_parallel():
    s = FSDP2Strategy(tensor_parallel_size="auto")
    assert s._tensor_parallel_size == 1 and s._data_parallel_size == "auto"
    with pytest.raises(ValueError, match="tensor_parallel_size must be 1, got 2"):
        FSDP2Strategy(tensor_parallel_size=2)
