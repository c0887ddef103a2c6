"""Embedding unification: folding the up-projectors into the table leaves the model's inputs unchanged."""

import pytest
import torch

from kelix.llm.data import collate_docs
from kelix.llm.model import KelixLM
from kelix.llm.unify import main, unify_embeddings

from .conftest import random_doc_batch


def test_folding_gives_identical_inputs(make_lm, image_tokenizer):
    lm = make_lm(seed=4, visual_input="projector").eval()
    batch = collate_docs(random_doc_batch(lm, [11, 8], seed=2), 4)
    t, c = batch["tokens"], batch["codes"]
    with torch.no_grad():
        before = lm.embed_blocks(t, c)
        # the stage-1 input of a visual block is the LLM up-projector over the tokenizer's embedding
        vis = t < 0
        torch.testing.assert_close(before[vis], lm.visual.up_projector(image_tokenizer.embed_codes(c[vis])),
                                   rtol=1e-5, atol=1e-5)
        j = torch.arange(4).expand(5, 4)
        codes = torch.randint(0, 32, (5, 4))
        rows_before = lm.code_embed(j, codes)
        pred_before = lm(t, c, batch["position_ids"], batch["targets"], return_logits=True)
        unify_embeddings(lm)
        assert lm.visual is None and lm.config.visual_input == "table"
        after = lm.embed_blocks(t, c)
        torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)  # float rounding only
        assert torch.equal(after[~vis], before[~vis])  # text rows are not touched
        torch.testing.assert_close(lm.code_embed(j, codes), rows_before, rtol=1e-6, atol=1e-6)  # decoder inputs too
        pred_after = lm(t, c, batch["position_ids"], batch["targets"], return_logits=True)
    finite = pred_before.logits0.isfinite()
    torch.testing.assert_close(pred_after.logits0[finite], pred_before.logits0[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred_after.code_logits, pred_before.code_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="nothing to unify"):
        unify_embeddings(lm)


def test_verb_writes_a_table_model(make_lm, tmp_path, capsys):
    lm = make_lm(seed=5, visual_input="projector").eval()
    lm.save_pretrained(tmp_path / "s1")
    assert main(["--src", str(tmp_path / "s1"), "--out", str(tmp_path / "s2")]) == 0
    out = KelixLM.from_pretrained(tmp_path / "s2")
    assert out.visual is None and out.config.visual_input == "table"
    v = out.vocab
    table = out.backbone.get_input_embeddings().weight[v.visual_offset:v.size]
    torch.testing.assert_close(table, lm.visual.table(), rtol=0, atol=0)


def test_unified_visual_embeddings_span_more_than_d_dims(make_lm):
    """With per-slot up-projections the folded table's block embeddings are not squeezed into d dims."""
    lm = make_lm(seed=6, visual_input="projector").eval()
    unify_embeddings(lm)
    codes = torch.randint(0, 32, (300, 4), generator=torch.Generator().manual_seed(0))
    tokens = torch.full((1, 300), -1)
    with torch.no_grad():
        blocks = lm.embed_blocks(tokens, codes[None])[0]
    sv = torch.linalg.svdvals(blocks.float())
    assert int((sv > 1e-4 * sv[0]).sum()) > 16 + 1  # d = 16 (+1: the bias)
