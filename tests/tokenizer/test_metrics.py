import math

import pytest
import torch

from kelix.tokenizer.metrics import CodebookUsage


def test_usage_perplexity_dead_exact_on_hand_made_counts():
    m = CodebookUsage(N=2, K=4)
    # sub-codebook 0 uses codes 0 and 1 equally; sub-codebook 1 uses all four, counts 1, 1, 1, 1
    m.update(torch.tensor([[0, 0], [1, 1], [0, 2], [1, 3]]))
    out = m.compute()
    torch.testing.assert_close(out["usage"], torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(out["perplexity"], torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(out["dead"], torch.tensor([2.0, 0.0]))


def test_perplexity_of_a_skewed_distribution_and_reset():
    m = CodebookUsage(N=1, K=8)
    m.update(torch.tensor([[0]] * 3 + [[5]]))
    p = torch.tensor([0.75, 0.25])
    expected = math.exp(-(p * p.log()).sum().item())
    assert m.compute()["perplexity"].item() == pytest.approx(expected, rel=1e-6)
    assert m.compute()["usage"].item() == 0.25
    m.reset()
    m.update(torch.tensor([[[7], [7]]]))  # any leading shape [..., N]
    assert m.compute()["dead"].item() == 7 and m.compute()["perplexity"].item() == 1.0


def test_counts_sum_like_a_distributed_reduce():
    a, b = CodebookUsage(N=2, K=3), CodebookUsage(N=2, K=3)
    a.update(torch.tensor([[0, 1]]))
    b.update(torch.tensor([[2, 1]]))
    a.merge_state(b)  # what dist_reduce_fx="sum" does across ranks
    torch.testing.assert_close(a.counts, torch.tensor([[1, 0, 1], [0, 2, 0]]))
    torch.testing.assert_close(a.compute()["usage"], torch.tensor([2 / 3, 1 / 3]))


def test_out_of_range_codes_fail_clearly():
    with pytest.raises(ValueError, match="0..3"):
        CodebookUsage(N=1, K=4).update(torch.tensor([[4]]))
