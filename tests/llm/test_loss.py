"""The NBP loss on hand-made predictions: exact values for both block weightings."""

import math

import pytest
import torch
from torch.nn import functional as F

from kelix.llm.loss import nbp_loss
from kelix.llm.model import BlockPrediction


def from_logits(logits0, labels0, is_visual, code_logits, code_labels) -> BlockPrediction:
    nll0 = F.cross_entropy(logits0, labels0, reduction="none")
    nll_c = F.cross_entropy(code_logits.flatten(0, 1), code_labels.flatten(), reduction="none").view(code_labels.shape)
    where = (torch.zeros(len(labels0), dtype=torch.long), torch.arange(len(labels0)))
    return BlockPrediction(nll0, logits0.argmax(-1) == labels0, logits0.argmax(-1), labels0, is_visual, nll_c,
                           code_logits.argmax(-1) == code_labels, code_labels, where)


def _pred():
    # two targets: a text block (label 0 of 3 slot-0 columns) and a visual block (N = 3)
    logits0 = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0]])  # nll: ln 3, ln 4 - ln 2 = ln 2
    labels0 = torch.tensor([0, 1])
    code_logits = torch.zeros(1, 2, 4)  # uniform over K = 4: nll ln 4 per code
    code_labels = torch.tensor([[1, 3]])
    return from_logits(logits0, labels0, torch.tensor([False, True]), code_logits, code_labels)


def test_sum_is_eq6_averaged_over_blocks():
    out = nbp_loss(_pred(), N=3, block_loss="sum")
    text, visual = math.log(3), math.log(2) + 2 * math.log(4)
    assert out["loss"].item() == pytest.approx((text + visual) / 2)
    assert out["nll_text"].item() == pytest.approx(math.log(3))
    assert out["nll_visual"].item() == pytest.approx(visual / 3)
    assert out["nll_slot0"].item() == pytest.approx(math.log(2))
    assert out["nll_slot2"].item() == pytest.approx(math.log(4))
    assert out["acc_text"].item() == 1.0  # argmax of three ties is index 0
    assert out["acc_visual"].item() == pytest.approx(1 / 3)  # slot 0 right; uniform codes pick 0, labels 1 and 3
    assert (out["blocks_text"].item(), out["blocks_visual"].item()) == (1, 1)


def test_equal_block_weights_every_block_the_same():
    out = nbp_loss(_pred(), N=3, block_loss="equal_block")
    m_text, m_vis = 2, 4  # <eob> included
    w_text, w_vis = (m_text + m_vis) / (2 * m_text), (m_text + m_vis) / (2 * m_vis)
    assert (w_text * m_text, w_vis * m_vis) == (3.0, 3.0)
    total = w_text * math.log(3) + w_vis * (math.log(2) + 2 * math.log(4))
    assert out["loss"].item() == pytest.approx(total / (m_text + m_vis))


def test_official_weights_at_n8():
    m_text, m_vis = 2, 9
    assert (m_text + m_vis) / (2 * m_text) == 2.75 and round((m_text + m_vis) / (2 * m_vis), 3) == 0.611


def test_text_only_batch_has_no_visual_terms_and_a_gradient():
    logits0 = torch.zeros(1, 3, requires_grad=True)
    q = from_logits(logits0, torch.tensor([2]), torch.tensor([False]), torch.zeros(0, 2, 4),
                    torch.zeros(0, 2, dtype=torch.long))
    out = nbp_loss(q, N=3)
    assert "nll_visual" not in out and out["blocks_visual"].item() == 0
    out["loss"].backward()
    assert logits0.grad is not None


def test_unknown_weighting_is_rejected():
    with pytest.raises(ValueError, match="block_loss"):
        nbp_loss(_pred(), N=3, block_loss="mean")
