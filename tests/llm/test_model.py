"""KelixLM: block encoder, parity with the plain transformers model, slot-restricted heads, packing,
save/load."""

import pytest
import torch

from kelix.llm.data import collate_docs
from kelix.llm.loss import nbp_loss
from kelix.llm.model import KelixLM

from .conftest import random_doc_batch


def test_block_encoder_sums_the_block_tokens_without_eob(lm_table):
    lm, v = lm_table, lm_table.vocab
    emb = lm.backbone.get_input_embeddings().weight
    tokens = torch.tensor([[5, -1, 7, -1]])
    codes = torch.full((1, 4, 4), -1)
    codes[0, 1] = torch.tensor([3, 0, 31, 9])
    codes[0, 3] = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        x = lm.embed_blocks(tokens, codes)
        assert torch.equal(x[0, 0], emb[5]) and torch.equal(x[0, 2], emb[7])  # text block {t, eob} -> e(t)
        for p in (1, 3):  # visual block {c_0..c_3, eob} -> sum_j e(offset + j*K + c_j)
            rows = emb[v.code_to_id(codes[0, p])]
            assert torch.equal(x[0, p], rows.sum(0))
        # <eob> never enters: changing its row changes nothing
        saved = emb[v.eob].clone()
        emb[v.eob] += 100.0
        try:
            assert torch.equal(lm.embed_blocks(tokens, codes), x)
        finally:
            emb[v.eob] = saved


@pytest.fixture(scope="module")
def lm_init(make_lm):
    """The table model as built: block decoder the identity, visual LM-head rows fresh."""
    return make_lm(untrained=True, visual_input="table").eval()


def test_text_only_sequence_matches_the_plain_transformers_model(lm_init, plain_lm):
    tokens = torch.randint(0, 259, (2, 9), generator=torch.Generator().manual_seed(0))
    codes = torch.full((2, 9, 4), -1)
    with torch.no_grad():
        h, _ = lm_init.hidden(lm_init.embed_blocks(tokens, codes), None)
        ref = plain_lm.model(input_ids=tokens, output_hidden_states=True)
        torch.testing.assert_close(lm_init.final_norm(h), ref.last_hidden_state, rtol=0, atol=1e-6)
        assert not torch.allclose(h, ref.last_hidden_state)  # h is taken before the final norm
        # the last layer's output, read inside the plain model (not through hidden_states, whose last
        # entry is before or after the norm depending on the transformers release)
        seen = []
        hook = plain_lm.model.norm.register_forward_pre_hook(lambda _, a: seen.append(a[0]))
        try:
            plain_lm.model(input_ids=tokens)
        finally:
            hook.remove()
        torch.testing.assert_close(h, seen[0], rtol=0, atol=1e-6)
        # at initialisation the block decoder is the identity, so text logits are the plain LM's
        pred = lm_init(tokens, codes, None, torch.ones_like(tokens, dtype=torch.bool), return_logits=True)
        plain_logits = plain_lm(input_ids=tokens).logits[:, :-1].reshape(-1, 320)
        torch.testing.assert_close(pred.logits0[:, :320].isfinite(), torch.ones_like(plain_logits, dtype=torch.bool)
                                   .index_fill_(1, torch.tensor([lm_init.vocab.eob]), False))
        keep = torch.arange(320) != lm_init.vocab.eob
        torch.testing.assert_close(pred.logits0[:, :320][:, keep], plain_logits[:, keep], rtol=0, atol=1e-5)


def test_new_visual_rows_take_no_probability_from_text_at_init(lm_init, plain_lm):
    """Slot 0 of a text position scores text ids and sub-codebook 0 together: the fresh visual rows
    must leave the pretrained LM's text distribution as it was."""
    lm, v = lm_init, lm_init.vocab
    tokens = torch.randint(0, 259, (3, 12), generator=torch.Generator().manual_seed(4))
    codes = torch.full((3, 12, v.N), -1)
    with torch.no_grad():
        pred = lm(tokens, codes, None, torch.ones_like(tokens, dtype=torch.bool), return_logits=True)
        p = pred.logits0.softmax(-1)
        visual_mass = p[:, v.visual_offset:].sum(-1)
        assert float(visual_mass.max()) < 1e-3
        keep = torch.arange(320) != v.eob
        plain = plain_lm(input_ids=tokens).logits[:, :-1].reshape(-1, 320)[:, keep].softmax(-1)
        torch.testing.assert_close(p[:, :320][:, keep], plain, rtol=0, atol=1e-3 / 320)
        # the code slots start near uniform over their sub-codebook (no random preference)
        code_p = lm.slot_logits(torch.randn(5, 64), 2).softmax(-1)
        assert float((code_p - 1 / v.K).abs().max()) < 0.2 / v.K


def test_slot_logits_cover_only_the_legal_rows(lm_table):
    lm, v = lm_table, lm_table.vocab
    out = torch.randn(6, 64)
    with torch.no_grad():
        assert lm.slot_logits(out, 0).shape == (6, v.visual_offset + v.K)
        assert lm.slot_logits(out, 0, "text").shape == (6, v.visual_offset)
        assert torch.isinf(lm.slot_logits(out, 0)[:, v.eob]).all()  # eob never starts a block
        full = lm.backbone.lm_head(lm.final_norm(out))
        for j in range(1, v.N):
            lo, hi = v.slot_range(j)
            torch.testing.assert_close(lm.slot_logits(out, j), full[:, lo:hi])


def test_restricted_probabilities_put_no_mass_outside_the_legal_range(lm_table):
    lm, v = lm_table, lm_table.vocab
    out = torch.randn(5, 64)
    with torch.no_grad():
        for slot, kind in [(0, "any"), (0, "text"), (1, "visual"), (3, "visual")]:
            lo, hi = v.slot_ranges(kind)[slot]
            p = lm.slot_logits(out, slot, kind).softmax(-1)
            full = torch.zeros(5, v.size)
            full[:, lo:hi] = p
            assert torch.allclose(full.sum(-1), torch.ones(5))
            assert full[:, :lo].sum() == 0 and full[:, hi:].sum() == 0


def test_packed_batch_equals_unpacked_batch(lm_table):
    lm = lm_table
    docs = random_doc_batch(lm, [7, 12, 5, 9], seed=1)
    unpacked = collate_docs(docs, 4, pack=False)
    packed = collate_docs(docs, 4, pack=True, max_blocks=20)
    assert packed["tokens"].shape[0] == 2 and unpacked["tokens"].shape[0] == 4
    with torch.no_grad():
        outs = []
        for b in (unpacked, packed):
            pred = lm(b["tokens"], b["codes"], b["position_ids"], b["targets"], return_hidden=True)
            outs.append((pred, nbp_loss(pred, 4)))
    (pu, lu), (pp, lp) = outs
    torch.testing.assert_close(lp["loss"], lu["loss"], rtol=0, atol=1e-5)
    # the hidden state of every real block is the same, wherever its document sits
    lengths = [len(d) for d in docs]
    for b in (unpacked, packed):
        b["where"] = []
    for i, n in enumerate(lengths):
        hu = pu.hidden[i, :n]
        row, off = _find(packed, docs[i])
        hp = pp.hidden[row, off:off + n]
        torch.testing.assert_close(hp, hu, rtol=0, atol=1e-5)
    assert lu["blocks_visual"] == lp["blocks_visual"] > 0


def _find(batch, doc):
    n = len(doc)
    t = torch.tensor(doc.tokens)
    for r in range(batch["tokens"].shape[0]):
        for off in range(batch["tokens"].shape[1] - n + 1):
            if batch["position_ids"][r, off] == 0 and torch.equal(batch["tokens"][r, off:off + n], t):
                return r, off
    raise AssertionError("document not found in the packed batch")


@pytest.mark.parametrize("mode", ["table", "projector"])
def test_save_and_load_round_trip(make_lm, tmp_path, mode):
    lm = make_lm(seed=2, visual_input=mode)
    lm.save_pretrained(tmp_path / "lm")
    back = KelixLM.from_pretrained(tmp_path / "lm")
    assert back.portable_config() == lm.portable_config() and back.vocab == lm.vocab
    assert (back.visual is None) == (mode == "table")
    sd, sd2 = lm.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert (tmp_path / "lm" / "backbone" / "config.json").is_file()  # transformers can read the backbone alone
    assert back.text_tokenizer("<|eob|>", add_special_tokens=False)["input_ids"] == [lm.vocab.eob]


def test_loading_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Kelix LLM directory"):
        KelixLM.from_pretrained(tmp_path / "nope")


def test_chunked_loss_equals_the_whole_loss_and_its_gradients(make_lm):
    grads, losses = [], []
    for chunk in (10_000, 3):  # 3: many chunks, each recomputed in backward
        lm = make_lm(seed=6, loss_chunk=chunk)
        docs = random_doc_batch(lm, [9, 13], seed=3)
        b = collate_docs(docs, 4)
        pred = lm(b["tokens"], b["codes"], b["position_ids"], b["targets"], return_logits=True)
        nll = torch.nn.functional.cross_entropy(pred.logits0, pred.labels0, reduction="none")
        torch.testing.assert_close(pred.nll0, nll)
        loss = nbp_loss(pred, 4)["loss"]
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in lm.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def test_validation_is_chunked_like_training(make_lm, monkeypatch):
    """Under no_grad (validation) no slot's logits cover more than loss_chunk targets at once, and the
    loss is the unchunked one."""
    from kelix.llm.config import LLMConfig
    from kelix.llm.module import UnifiedLLMModule

    lm = make_lm(seed=6, loss_chunk=3).eval()
    b = collate_docs(random_doc_batch(lm, [9, 13, 6], seed=3), 4)
    rows, real = [], lm.slot_logits
    monkeypatch.setattr(lm, "slot_logits", lambda out, slot, kind=None: rows.append(out.shape[0]) or real(out, slot, kind))
    with torch.no_grad():
        chunked = lm(b["tokens"], b["codes"], b["position_ids"], b["targets"])
    P = int(b["targets"][:, 1:].sum())
    assert P > 9 and rows and max(rows) <= 3 and sum(rows) >= P
    lm.config.loss_chunk = 10_000
    with torch.no_grad():
        whole = lm(b["tokens"], b["codes"], b["position_ids"], b["targets"])
    for name in ("nll0", "hit0", "argmax0", "nll_codes", "hit_codes"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=0, atol=1e-6)
    # the module's validation step goes through the same bound
    module = UnifiedLLMModule(LLMConfig(backbone_config=None, backbone=lm.config.backbone, text_tokenizer="builtin:bytes",
                                        N=4, K=32, loss_chunk=3, decoder_width=32, decoder_heads=2, decoder_ffn=64))
    rows.clear()
    real_m = module.lm.slot_logits
    monkeypatch.setattr(module.lm, "slot_logits",
                        lambda out, slot, kind=None: rows.append(out.shape[0]) or real_m(out, slot, kind))
    with torch.no_grad():
        out = module.step(b, "val")
    assert max(rows) <= 3 and torch.isfinite(out["loss"])


def test_an_export_from_before_visual_bias_loads_as_it_ran(make_lm, tmp_path):
    from safetensors.torch import load_file, save_file

    lm = make_lm(seed=2, visual_input="table")
    assert float(lm.visual_bias.detach()) < -1  # fresh: log(visual_init_mass * V / K)
    lm.save_pretrained(tmp_path / "lm")
    f = tmp_path / "lm" / "model.safetensors"
    sd = load_file(f)
    del sd["visual_bias"]
    save_file(sd, f, metadata={"format": "pt"})
    back = KelixLM.from_pretrained(tmp_path / "lm")
    assert float(back.visual_bias.detach()) == 0.0
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in lm.state_dict().items() if k != "visual_bias")
