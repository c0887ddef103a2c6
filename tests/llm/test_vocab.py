"""The extended vocabulary: specials, code <-> id maps, per-slot legal ranges."""

import pytest
import torch

from kelix.data.text import load_text_tokenizer
from kelix.llm.vocab import SPECIAL_TOKENS, Vocab, extend_text_tokenizer, special_ids


@pytest.fixture(scope="module")
def vocab():
    return Vocab.build(extend_text_tokenizer(load_text_tokenizer("builtin:bytes")), visual_offset=320, N=4, K=32)


def test_extension_is_idempotent_and_adds_only_missing_specials():
    tok = load_text_tokenizer("builtin:bytes")
    before = len(tok)  # 256 bytes + <|im_end|>, <|endoftext|>, <|im_start|>
    extend_text_tokenizer(tok)
    ids = special_ids(tok)
    assert len(tok) == before + 5  # im_start/im_end exist already
    assert ids["im_start"] == 258 and ids["im_end"] == 256
    extend_text_tokenizer(tok)
    assert len(tok) == before + 5 and special_ids(tok) == ids
    assert set(ids) == set(SPECIAL_TOKENS)


def test_code_j_of_subcodebook_i_is_offset_plus_i_K_plus_j(vocab):
    codes = torch.tensor([[0, 0, 0, 0], [31, 1, 2, 31]])
    ids = vocab.code_to_id(codes)
    assert ids.tolist() == [[320, 352, 384, 416], [351, 353, 386, 447]]
    j, c = vocab.id_to_code(ids)
    assert j.tolist() == [[0, 1, 2, 3]] * 2 and torch.equal(c, codes)
    assert vocab.size == 320 + 128 and vocab.S == 128
    with pytest.raises(ValueError, match="outside the visual range"):
        vocab.id_to_code(torch.tensor([5]))


def test_slot_ranges(vocab):
    eob = (vocab.eob, vocab.eob + 1)
    assert vocab.slot_ranges("text") == [(0, 320), eob]
    assert vocab.slot_ranges("visual") == [(320, 352), (352, 384), (384, 416), (416, 448), eob]
    assert vocab.slot_ranges("any") == [(0, 352)]
    assert vocab.block_size("text") == 2 and vocab.block_size("visual") == 5
    assert vocab.slot0_banned() == [vocab.eob]


def test_specials_must_be_text_ids():
    tok = extend_text_tokenizer(load_text_tokenizer("builtin:bytes"))
    with pytest.raises(ValueError, match="not below visual_offset"):
        Vocab.build(tok, visual_offset=260, N=4, K=32)
