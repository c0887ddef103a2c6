"""eob_scoring: full (the official loss): every slot over the whole vocabulary and <eob> predicted by
one more decoder position; checked against a by-hand computation from the decoder and the LM head."""

import pytest
import torch
from torch.nn import functional as F

from kelix.llm.data import collate_docs
from kelix.llm.loss import nbp_loss
from kelix.llm.model import KelixLM
from tests.llm.conftest import random_doc_batch


@pytest.fixture(scope="module")
def lm_full(make_lm):
    return make_lm(seed=3, visual_input="table", eob_scoring="full").eval()


def by_hand(lm, b, pred):
    """Per target block the summed NLL of its tokens and its <eob>, each over every id (column c = id c)."""
    emb, N, K, vo = lm.backbone.get_input_embeddings(), lm.vocab.N, lm.vocab.K, lm.vocab.visual_offset
    rows, pos = pred.where
    totals, eobs = [], []
    for r, p in zip(rows.tolist(), pos.tolist()):
        h = pred.hidden[r, p]
        t, codes = int(b["tokens"][r, p + 1]), b["codes"][r, p + 1]
        if t >= 0:
            x, ids = torch.stack([h, emb.weight[t]]), [t, lm.vocab.eob]
        else:
            x = torch.cat([h[None], torch.stack([emb.weight[vo + j * K + int(codes[j])] for j in range(N)])])
            ids = [vo + j * K + int(codes[j]) for j in range(N)] + [lm.vocab.eob]
        out = lm.decoder(x[None], kind="text" if t >= 0 else "visual")[0]
        logits = lm.lm_head(lm.final_norm(out)).float()
        logits[0, vo:] += lm.visual_bias  # slot 0's learned log-prior of visual ids, as slot_logits
        nll = F.cross_entropy(logits, torch.tensor(ids), reduction="none")
        totals.append(nll.sum())
        eobs.append(nll[-1])
    return torch.stack(totals), torch.stack(eobs)


def test_full_scoring_is_the_sum_over_every_token_and_eob(lm_full):
    lm = lm_full
    assert lm.decoder.slot_embed.num_embeddings == lm.vocab.N + 1
    b = collate_docs(random_doc_batch(lm, [8, 11], seed=4), lm.vocab.N)
    with torch.no_grad():
        pred = lm(b["tokens"], b["codes"], b["position_ids"], b["targets"], return_hidden=True)
        totals, eobs = by_hand(lm, b, pred)
        out = nbp_loss(pred, lm.vocab.N, "sum")
    assert bool(pred.is_visual.any()) and bool((~pred.is_visual).any())
    torch.testing.assert_close(pred.nll_eob, eobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], totals.mean(), rtol=1e-5, atol=1e-5)
    assert out["nll_eob"].item() == pytest.approx(eobs.mean().item(), rel=1e-5)
    # equal_block: the official weights, <eob> now a scored token of each block
    m_text, m_vis = 2, lm.vocab.N + 1
    w = torch.where(pred.is_visual, (m_text + m_vis) / (2 * m_vis), (m_text + m_vis) / (2 * m_text))
    n = torch.where(pred.is_visual, m_vis, m_text).sum()
    torch.testing.assert_close(nbp_loss(pred, lm.vocab.N, "equal_block")["loss"], (w * totals).sum() / n,
                               rtol=1e-5, atol=1e-5)


def test_the_step_plan_selects_the_same_predictions(lm_full):
    lm = lm_full
    b = collate_docs(random_doc_batch(lm, [9, 6, 12], seed=5), lm.vocab.N, pack=True, max_blocks=20)
    with torch.no_grad():
        ref = lm(b["tokens"], b["codes"], b["position_ids"], b["targets"])
        got = lm(b["tokens"], b["codes"], b["position_ids"], b["targets"], plan=b["plan"])
    for k in ("nll0", "nll_codes", "nll_eob"):
        torch.testing.assert_close(getattr(got, k), getattr(ref, k), rtol=1e-5, atol=1e-6, msg=k)


def test_implied_scoring_has_no_eob_term_and_the_option_survives_a_save(lm_full, make_lm, tmp_path):
    plain = make_lm(seed=3, visual_input="table").eval()
    b = collate_docs(random_doc_batch(plain, [8], seed=4), plain.vocab.N)
    with torch.no_grad():
        pred = plain(b["tokens"], b["codes"], b["position_ids"], b["targets"])
    assert pred.nll_eob is None and "nll_eob" not in nbp_loss(pred, plain.vocab.N)
    lm_full.save_pretrained(tmp_path / "full")
    back = KelixLM.from_pretrained(tmp_path / "full")
    assert back.config.eob_scoring == "full" and back.decoder.slot_embed.num_embeddings == back.vocab.N + 1
    with pytest.raises(ValueError, match="eob_scoring full needs predictor: block_decoder"):
        make_lm(predictor="parallel", eob_scoring="full")
