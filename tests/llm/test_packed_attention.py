"""Packed rows under ``kelix_varlen`` attention equal each document run alone (and the dense-mask path)."""

import pytest
import torch

from kelix.llm import attention
from kelix.llm.attention import doc_bounds
from kelix.llm.data import collate_docs
from kelix.llm.loss import nbp_loss
from tests.llm.conftest import random_doc_batch

LENGTHS = [7, 12, 5, 9, 3]


def test_document_bounds_follow_position_restarts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    assert doc_bounds(pos).tolist() == [0, 3, 5, 6, 10, 12]
    # a row that continues the previous row's positions is still a new document
    assert doc_bounds(torch.tensor([[0, 1], [2, 3]])).tolist() == [0, 2, 4]


@pytest.fixture
def calls(monkeypatch):
    """Documents seen by each varlen attention call (None: the SDPA delegation)."""
    seen, real = [], attention.varlen_attention

    def spy(*args, cu_seq_lens_q=None, **kw):
        seen.append(None if cu_seq_lens_q is None else cu_seq_lens_q.numel() - 1)
        return real(*args, cu_seq_lens_q=cu_seq_lens_q, **kw)

    from transformers import AttentionInterface

    attention.register()
    AttentionInterface.register(attention.VARLEN, spy)
    yield seen
    AttentionInterface.register(attention.VARLEN, real)


def _forward(lm, batch, grad=False, positions=True):
    with torch.set_grad_enabled(grad):
        pred = lm(batch["tokens"], batch["codes"], batch["position_ids"] if positions else None, batch["targets"],
                  return_hidden=True)
        return pred, nbp_loss(pred, lm.vocab.N)


def test_varlen_packed_rows_equal_each_document_alone(make_lm, calls):
    lm = make_lm(seed=3, visual_input="table", packed_attention="varlen").eval()
    docs = random_doc_batch(lm, LENGTHS, seed=4)
    packed = collate_docs(docs, lm.vocab.N, pack=True, max_blocks=20)
    assert packed["tokens"].shape[0] < len(docs)  # several documents share a row
    pp, lp = _forward(lm, packed)
    assert calls and all(c is not None and c >= len(docs) for c in calls)  # the varlen path ran, no mask
    losses, blocks = [], []
    for d in docs:  # reference: each document alone in its row, plain causal SDPA (no position ids: no varlen)
        calls.clear()
        pu, lu = _forward(lm, collate_docs([d], lm.vocab.N, pack=False), positions=False)
        assert set(calls) == {None}
        n = len(d)
        hits = [(r, o) for r in range(packed["tokens"].shape[0]) for o in range(packed["tokens"].shape[1] - n + 1)
                if packed["position_ids"][r, o] == 0 and torch.equal(packed["tokens"][r, o:o + n], torch.tensor(d.tokens))]
        r, o = hits[0]
        torch.testing.assert_close(pp.hidden[r, o:o + n], pu.hidden[0, :n], rtol=0, atol=1e-5)
        w = float(lu["blocks_text"] + lu["blocks_visual"])
        losses.append(lu["loss"] * w)
        blocks.append(w)
    torch.testing.assert_close(lp["loss"], sum(losses) / sum(blocks), rtol=0, atol=1e-5)


def test_varlen_loss_and_gradients_equal_the_dense_mask_path(make_lm, calls):
    docs = None
    out = []
    for mode in ("mask", "varlen"):
        lm = make_lm(seed=5, visual_input="table", packed_attention=mode)
        docs = docs or random_doc_batch(lm, LENGTHS, seed=6)
        b = collate_docs(docs, lm.vocab.N, pack=True, max_blocks=24)
        calls.clear()
        _, loss = _forward(lm, b, grad=True)
        loss["loss"].backward()
        out.append((loss["loss"].detach(), {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}))
        assert lm.backbone.config._attn_implementation == ("sdpa" if mode == "mask" else attention.VARLEN)
        assert bool(calls) == (mode == "varlen")
    (l0, g0), (l1, g1) = out
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-5)
    assert g0.keys() == g1.keys() and any("layers" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)


def test_auto_keeps_the_mask_path_off_cuda_and_varlen_refuses_eager(make_lm, calls):
    lm = make_lm(seed=3, visual_input="table", packed_attention="auto").eval()
    b = collate_docs(random_doc_batch(lm, LENGTHS, seed=4), lm.vocab.N, pack=True, max_blocks=20)
    _forward(lm, b)
    assert calls and set(calls) == {None}  # transformers' mask and SDPA, as before
    with pytest.raises(ValueError, match="packed_attention=varlen needs an sdpa backbone"):
        make_lm(packed_attention="varlen", attn_implementation="eager")


@pytest.mark.skipif(not torch.cuda.is_available() or attention.varlen_kernel() is None, reason="needs CUDA")
def test_cuda_varlen_kernel_equals_the_eager_fallback():
    torch.manual_seed(0)
    cu = torch.tensor([0, 100, 130, 384], dtype=torch.int32, device="cuda")
    q = torch.randn(1, 8, 384, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 2, 384, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))

    class M(torch.nn.Module):
        training = False

    fast, _ = attention.varlen_attention(M(), q, k, v, None, scaling=0.125, cu_seq_lens_q=cu, max_length_q=384)
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[:, :, s:e].float(), k[:, :, s:e].float(), v[:, :, s:e].float(), is_causal=True, scale=0.125,
        enable_gqa=True) for s, e in ((0, 100), (100, 130), (130, 384))], 2).transpose(1, 2)
    torch.testing.assert_close(fast.float(), ref, rtol=2e-2, atol=2e-2)
    fast.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.slow  # inductor compiles the layers on CPU for about 100 s
def test_compiled_layers_equal_the_eager_model(make_lm):
    out = []
    for compiled in (False, True):
        lm = make_lm(seed=7, visual_input="table", compile_layers=compiled)
        assert all((layer._compiled_call_impl is not None) == compiled for layer in lm.body.layers)
        b = collate_docs(random_doc_batch(lm, LENGTHS, seed=8), lm.vocab.N, pack=True, max_blocks=20)
        _, loss = _forward(lm, b, grad=True)
        loss["loss"].backward()
        out.append((loss["loss"].detach(), {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}))
        assert all(("_orig_mod" not in k) for k in lm.state_dict())  # checkpoints keep the model's names
    (l0, g0), (l1, g1) = out
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)
