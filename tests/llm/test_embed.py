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
