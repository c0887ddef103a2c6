"""Block decoders: teacher forcing equals step-by-step decoding with a cache; warm start at init."""

import torch

from kelix.llm.decoder import BlockDecoder, ParallelHeads


def _trained(dec):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # leave the zero init so the check is not trivial
    return dec


def test_block_decoder_step_by_step_matches_teacher_forcing():
    dec = _trained(BlockDecoder(hidden=24, slots=4, width=16, layers=2, heads=2, ffn=32)).eval()
    x = torch.randn(5, 4, 24)
    full = dec(x)
    cache = dec.new_cache()
    steps = torch.stack([dec.step(x[:, j], j, cache) for j in range(4)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dec(x[:, :2]), full[:, :2], rtol=1e-5, atol=1e-5)  # causal


def test_block_decoder_starts_as_the_identity():
    dec = BlockDecoder(hidden=24, slots=4, width=16, heads=2, ffn=32)
    x = torch.randn(3, 4, 24)
    assert torch.equal(dec(x), x)  # zero-initialised proj_out: slot 0 predicts what the pretrained LM does


def test_parallel_heads_read_only_h():
    heads = _trained(ParallelHeads(hidden=8, slots=3))
    x = torch.randn(2, 3, 8)
    out = heads(x)
    y = x.clone()
    y[:, 1:] = 0
    assert torch.equal(heads(y), out)
    cache = heads.new_cache()
    steps = torch.stack([heads.step(x[:, 0] if j == 0 else torch.zeros(2, 8), j, cache) for j in range(3)], 1)
    torch.testing.assert_close(steps, out)
    assert torch.equal(ParallelHeads(8, 3)(x)[:, 0], x[:, 0])
