"""Table 7 exp3, the 9-head predictor: head 1 reads h_i for a text block's token, heads 2..N+1 for a
visual block's N codes (distinct parameters; the paper's 9 for N = 8)."""

import torch

from kelix.llm.data import collate_docs
from kelix.llm.decoder import ParallelHeads

from .conftest import random_doc_batch


def _forward(lm, b):
    with torch.no_grad():
        return lm(b["tokens"], b["codes"], b["position_ids"], b["targets"], return_hidden=True, return_logits=True)


def test_text_and_code_heads_are_distinct_and_each_kind_reads_its_own(lm_parallel):
    lm, v = lm_parallel, lm_parallel.vocab
    dec = lm.decoder
    assert isinstance(dec, ParallelHeads)
    names = dict(dec.named_parameters())
    assert set(names) == {"text_head", "code_heads"} and names["code_heads"].shape == (v.N, 64, 64)
    b = collate_docs(random_doc_batch(lm, [9, 13, 7], seed=5), v.N)
    pred = _forward(lm, b)
    vis = pred.is_visual
    assert vis.any() and (~vis).any()
    hs = pred.hidden[pred.where]
    with torch.no_grad():  # by hand: text logits from the text head only, code j from code head j
        torch.testing.assert_close(pred.logits0[~vis], lm.slot_logits(hs[~vis] @ dec.text_head.T, 0))
        torch.testing.assert_close(pred.logits0[vis], lm.slot_logits(hs[vis] @ dec.code_heads[0].T, 0))
        for j in range(1, v.N):
            torch.testing.assert_close(pred.code_logits[:, j - 1], lm.slot_logits(hs[vis] @ dec.code_heads[j].T, j))
    saved = dec.code_heads.detach().clone()
    try:  # moving the code heads leaves text predictions exactly as they were, and the other way round
        with torch.no_grad():
            dec.code_heads.mul_(-1.0)
        moved = _forward(lm, b)
        assert torch.equal(moved.logits0[~vis], pred.logits0[~vis])
        assert not torch.allclose(moved.logits0[vis], pred.logits0[vis])
    finally:
        with torch.no_grad():
            dec.code_heads.copy_(saved)
    saved = dec.text_head.detach().clone()
    try:
        with torch.no_grad():
            dec.text_head.mul_(-1.0)
        moved = _forward(lm, b)
        assert torch.equal(moved.logits0[vis], pred.logits0[vis]) and torch.equal(moved.code_logits, pred.code_logits)
        assert not torch.allclose(moved.logits0[~vis], pred.logits0[~vis])
    finally:
        with torch.no_grad():
            dec.text_head.copy_(saved)


def test_parallel_heads_start_as_the_pretrained_lm(make_lm):
    lm = make_lm(untrained=True, predictor="parallel")
    x = torch.randn(3, 1, 64)
    assert torch.equal(lm.decoder(x, kind="text"), x)
    assert torch.equal(lm.decoder(x.expand(3, 4, 64), kind="visual"), x.expand(3, 4, 64))
