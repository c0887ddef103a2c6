"""Condition providers: pre-computed pass-through and the smoke-test prompt-bytes condition."""

import pytest
import torch

from kelix.dit.conditions import PrecomputedConditions, PromptBytesConditions


def test_prompt_bytes_are_table_rows_plus_positions():
    c = PromptBytesConditions(dim=8, max_length=4, seed=0)
    states, mask = c({"prompts": ["ab", "hello"]})
    assert states.shape == (2, 4, 8) and mask.tolist() == [[True, True, False, False], [True] * 4]
    table = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(states[0, 0], table[ord("a")] + torch.tensor([0.0, 1.0] * 4))  # sin 0, cos 0
    again, _ = PromptBytesConditions(dim=8, max_length=4, seed=0)({"prompts": ["ab", "hello"]})
    assert torch.equal(states, again) and c.dim == 8 and c.needs == "prompt"
    assert not any(True for _ in c.parameters())  # nothing to train, nothing saved


def test_precomputed_passes_states_and_mask_through():
    batch = {"cond": torch.ones(2, 3, 4, dtype=torch.float16), "cond_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    states, mask = PrecomputedConditions(dim=4)(batch)
    assert states.dtype == torch.float32 and mask.dtype == torch.bool and mask.sum() == 5
    with pytest.raises(KeyError, match="condition: precomputed"):
        PrecomputedConditions()({"prompts": ["x"]})
    with pytest.raises(ValueError, match="even number"):
        PromptBytesConditions(dim=7)
