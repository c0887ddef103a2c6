"""The DiT condition: hidden states of an image's positions in its text-to-image sequence."""

import pytest
import torch

from kelix.llm.condition import image_condition_states
from kelix.llm.data import collate_docs
from kelix.llm.layout import t2i_doc


def test_states_are_the_image_positions_before_the_final_norm(lm_table):
    lm = lm_table
    g = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, 32, (2, 3, 4), generator=g), torch.randint(0, 32, (1, 2, 4), generator=g)]
    prompts = ["a red square", "x"]
    states, mask = image_condition_states(lm, prompts, codes)
    # item 0: <|vision_start|> + 2 rows of (marker "0,3" = 5 blocks + 3 visual blocks)
    assert mask.sum(1).tolist() == [1 + 2 * (5 + 3), 1 + (5 + 2)]
    assert states.shape == (2, 17, 64) and (states[1, 8:] == 0).all()
    for b in range(2):  # the same values as a single unpadded run of that item
        doc, ref = t2i_doc(lm.layout, prompts[b], codes[b])
        batch = collate_docs([doc], 4)
        with torch.no_grad():
            h, _ = lm.hidden(lm.embed_blocks(batch["tokens"], batch["codes"]), None)
        torch.testing.assert_close(states[b, : ref.end - ref.start], h[0, ref.start:ref.end], rtol=1e-5, atol=1e-5)
        assert batch["tokens"][0, ref.start] == lm.vocab.vision_start and batch["tokens"][0, ref.end] == lm.vocab.vision_end
    only, m2 = image_condition_states(lm, prompts, codes, include_markers=False)
    assert m2.sum(1).tolist() == [6, 2]
    doc, ref = t2i_doc(lm.layout, prompts[0], codes[0])
    torch.testing.assert_close(only[0], states[0, [p - ref.start for p in ref.positions]])


def test_release_condition_runs_to_vision_end_inclusive_zero_padded(lm_table):
    """The released DiT's condition: <|vision_start|> .. <|vision_end|> inclusive, zero-padded to pad_to."""
    lm = lm_table
    g = torch.Generator().manual_seed(1)
    codes = [torch.randint(0, 32, (2, 3, 4), generator=g), torch.randint(0, 32, (1, 2, 4), generator=g)]
    prompts = ["a red square", "x"]
    short, m_short = image_condition_states(lm, prompts, codes)
    full, m_full = image_condition_states(lm, prompts, codes, include_end=True, pad_to=24)
    assert full.shape[1] == 24 and m_full.sum(1).tolist() == [n + 1 for n in m_short.sum(1).tolist()]
    assert (full[~m_full] == 0).all()
    for b in range(2):
        doc, ref = t2i_doc(lm.layout, prompts[b], codes[b])
        batch = collate_docs([doc], 4)
        with torch.no_grad():
            h, _ = lm.hidden(lm.embed_blocks(batch["tokens"], batch["codes"]), None)
        n = ref.end - ref.start + 1
        torch.testing.assert_close(full[b, :n], h[0, ref.start:ref.end + 1], rtol=1e-5, atol=1e-5)
    cut, m_cut = image_condition_states(lm, prompts, codes, include_end=True, pad_to=5)
    assert cut.shape[1] == 5 and m_cut.all() and torch.equal(cut, full[:, :5])
    with pytest.raises(ValueError, match="include_end needs include_markers"):
        image_condition_states(lm, prompts, codes, include_markers=False, include_end=True)
