"""Stage-1 visual embeddings: per-code rows that sum to the tokenizer's embedding through the up-projector."""

import pytest
import torch

from kelix.llm.embed import VisualProjector


@pytest.mark.parametrize("fusion", ["sum", "mean"])
def test_block_is_the_up_projected_tokenizer_embedding(image_tokenizer, fusion):
    image_tokenizer.config.fusion = fusion
    try:
        torch.manual_seed(1)
        vp = VisualProjector.from_tokenizer(image_tokenizer, hidden=48)
        codes = torch.randint(0, 32, (5, 7, 4))
        want = vp.up_projector(image_tokenizer.embed_codes(codes))  # W2 (W1 fuse(v) + b1) + b2
        torch.testing.assert_close(vp.block(codes), want, rtol=1e-5, atol=1e-5)
    finally:
        image_tokenizer.config.fusion = "sum"


def test_table_rows_are_in_id_order(image_tokenizer):
    vp = VisualProjector.from_tokenizer(image_tokenizer, hidden=48)
    table = vp.table()
    assert table.shape == (4 * 32, 48)
    j, c = torch.tensor([0, 2, 3]), torch.tensor([5, 0, 31])
    # equal up to float rounding (BLAS blocks differ with the batch size)
    torch.testing.assert_close(table[j * 32 + c], vp.rows(j, c), rtol=1e-6, atol=1e-6)


def test_tokenizer_part_is_frozen(image_tokenizer):
    vp = VisualProjector.from_tokenizer(image_tokenizer, hidden=48)
    trainable = {n for n, p in vp.named_parameters() if p.requires_grad}
    assert trainable == {"up_projector.weight", "up_projector.bias"}
    assert "code_vectors" in dict(vp.named_buffers())


@pytest.mark.parametrize("fusion", ["sum", "mean"])
@pytest.mark.parametrize("up_projection", ["per_slot", "shared"])
def test_rows_table_and_block_agree_for_both_up_projections(up_projection, fusion):
    from kelix.tokenizer.model import KelixTokenizer, tiny_config

    torch.manual_seed(3)
    tok = KelixTokenizer(tiny_config(up_projection=up_projection, fusion=fusion)).eval()
    vp = VisualProjector.from_tokenizer(tok, hidden=48)
    codes = torch.randint(0, 32, (6, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = vp.up_projector(tok.embed_codes(codes))  # the tokenizer path, then stage 1's projector
        torch.testing.assert_close(vp.block(codes), want, rtol=1e-5, atol=1e-5)
        j = torch.arange(4).expand_as(codes)
        torch.testing.assert_close(vp.rows(j, codes).sum(-2), want, rtol=1e-5, atol=1e-5)
        table = vp.table()
        torch.testing.assert_close(table[j * 32 + codes].sum(-2), want, rtol=1e-5, atol=1e-5)
        # each row is that slot's projected code vector (plus its share of the bias)
        w, b = tok.slot_projection()
        s = 1.0 if fusion == "sum" else 0.25
        row = vp.up_projector.weight @ (s * w[:, 16 * 2:16 * 3] @ tok.code_vectors()[2, 7]) + vp._bias()
        torch.testing.assert_close(table[2 * 32 + 7], row, rtol=1e-5, atol=1e-5)


def test_stage1_state_from_before_per_slot_projections_loads(image_tokenizer):
    """A saved stage-1 projector with one shared W1 [out, d] loads as W1 repeated per slot: same rows."""
    from kelix.tokenizer.model import KelixTokenizer, tiny_config

    torch.manual_seed(2)
    tok = KelixTokenizer(tiny_config(up_projection="shared")).eval()
    vp = VisualProjector.from_tokenizer(tok, hidden=48)
    old = {k: v.clone() for k, v in vp.state_dict().items()}
    old["tok_up.weight"] = tok.up_projector.weight.detach().clone()  # [64, 16]: the old layout
    fresh = VisualProjector(4, 32, 16, 64, 48)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.table(), vp.table(), rtol=0, atol=0)


def test_standardize_centres_the_blocks_and_sets_their_norm(image_tokenizer):
    vp = VisualProjector.from_tokenizer(image_tokenizer, 48)
    vp.code_vectors.add_(torch.linspace(1, 3, vp.d))  # code vectors sharing a direction, as a random encoder's do
    codes = torch.randint(vp.K, (4096, vp.N), generator=torch.Generator().manual_seed(1))
    before = vp.block(codes).detach()
    assert before.mean(0).norm() > 0.5 * before.norm(dim=-1).mean()  # a common direction dominates
    vp.standardize(0.25)
    after = vp.block(codes).detach()
    assert after.norm(dim=-1).mean() == pytest.approx(0.25, rel=0.05)
    assert after.mean(0).norm() < 0.1 * 0.25  # centred
    # still a linear map of the code vectors: the folded table gives the same blocks
    rows = vp.table().view(vp.N, vp.K, -1)
    torch.testing.assert_close(rows[torch.arange(vp.N), codes].sum(1), after, atol=1e-5, rtol=1e-5)
