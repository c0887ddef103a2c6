"""Cross-attention 2D RoPE (the released Kelix-DiT's ``use_cross_attn_rope``) against hand computations."""

import math

import pytest
import torch

from kelix.dit.rope import (
    CrossAttnRoPEProcessor,
    apply_rope,
    condition_positions,
    latent_positions,
    rope_cos_sin,
)


def test_each_pair_turns_by_row_then_column_frequencies():
    x = torch.randn(1, 1, 1, 8, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_cos_sin(torch.tensor([[[2, 3]]]), 8)
    out = apply_rope(x, cos[0], sin[0])[0, 0, 0]
    v = x[0, 0, 0].tolist()
    # head 8: frequencies 10000^(-4i/8) = 1, 0.01; pairs (i, i+4) turn by row*f0, row*f1, col*f0, col*f1
    angles = [2 * 1.0, 2 * 0.01, 3 * 1.0, 3 * 0.01]
    for i, a in enumerate(angles):
        assert out[i].item() == pytest.approx(v[i] * math.cos(a) - v[i + 4] * math.sin(a), abs=1e-6)
        assert out[i + 4].item() == pytest.approx(v[i + 4] * math.cos(a) + v[i] * math.sin(a), abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_cos_sin(torch.zeros(1, 2, dtype=torch.long), 6)


def test_latent_positions_are_row_major():
    assert latent_positions(2, 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_condition_positions_follow_the_release_rule():
    # a 4x3 image grid with 34 condition states: w' = 3 + ceil((34 - 12) / 4) = 9
    p = condition_positions(torch.tensor([34]), 64, 64, (4, 3))[0]
    assert p[17].tolist() == [1, 8] and p[35].tolist() == [3, 8] and (p[36:] == 0).all()
    # the release samples on floor(sqrt(720)) = 26 per side: 416 states -> w' = 26 - 10 = 16
    p = condition_positions(torch.tensor([416, 0]), 720, 720)
    assert p[0, 415].tolist() == [25, 15] and (p[0, 416:] == 0).all() and (p[1] == 0).all()
    # a grid over max_length is fitted first (10x10 -> 8x8 within 64), then widened: 8 + ceil(-14/8) = 7
    p = condition_positions(torch.tensor([50]), 64, 64, torch.tensor([[10, 10]]))[0]
    assert p[49].tolist() == [7, 0] and p[48].tolist() == [6, 6]


def _attention(heads=2, dim_head=8):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=16, heads=heads, dim_head=dim_head, bias=True,
                     qk_norm="rms_norm_across_heads", kv_heads=heads)
    with torch.no_grad():
        attn.norm_q.weight.uniform_(0.5, 1.5)
        attn.norm_k.weight.uniform_(0.5, 1.5)
    return attn.eval()


def _by_hand(attn, x, cond, bias, qpos, kpos):
    """Softmax attention with each (i, i + d/2) pair of q and k turned by an explicit 2x2 rotation."""
    h, d = attn.heads, attn.inner_dim // attn.heads

    def split(t):
        return t.view(t.shape[0], t.shape[1], h, d).transpose(1, 2)

    def turn(t, pos):
        cos, sin = rope_cos_sin(pos, d)
        out = t.clone()
        for i in range(d // 2):
            a, b = t[..., i], t[..., i + d // 2]
            c, s = cos[..., i][:, None], sin[..., i][:, None]
            out[..., i], out[..., i + d // 2] = a * c - b * s, b * c + a * s
        return out

    q = turn(split(attn.norm_q(attn.to_q(x))), qpos)
    k = turn(split(attn.norm_k(attn.to_k(cond))), kpos)
    v = split(attn.to_v(cond))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias[:, None, None], -1)
    return attn.to_out[0]((w @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], h * d))


def test_processor_is_rotary_cross_attention_with_the_key_mask():
    attn = _attention()
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 6, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    bias = (1 - mask) * -10000.0
    qpos = latent_positions(2, 3)[None].expand(2, -1, -1)
    kpos = condition_positions(mask.sum(1).long(), 5, 64, (2, 2))
    proc = CrossAttnRoPEProcessor()
    attn.set_processor(proc)
    with pytest.raises(RuntimeError, match="no positions"):
        attn(x, encoder_hidden_states=cond, attention_mask=bias[:, None])
    proc.set_positions(rope_cos_sin(qpos, 8), rope_cos_sin(kpos, 8))
    with torch.no_grad():
        got = attn(x, encoder_hidden_states=cond, attention_mask=bias[:, None])
        want = _by_hand(attn, x, cond, bias, qpos, kpos)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        # only relative positions count: the same shift of every query and key changes nothing
        shift = torch.tensor([3, 5])
        proc.set_positions(rope_cos_sin(qpos + shift, 8), rope_cos_sin(kpos + shift, 8))
        torch.testing.assert_close(attn(x, encoder_hidden_states=cond, attention_mask=bias[:, None]), got,
                                   rtol=0, atol=1e-5)
        # and positions do count
        proc.set_positions(rope_cos_sin(qpos, 8), rope_cos_sin(kpos.flip(1), 8))
        assert not torch.allclose(attn(x, encoder_hidden_states=cond, attention_mask=bias[:, None]), got, atol=1e-4)


def test_kelix_dit_sets_the_processor_and_its_positions():
    from tests.dit.conftest import tiny_dit

    dit = tiny_dit(cross_attn_rope=True)
    procs = {type(b.attn2.processor).__name__ for b in dit.transformer.transformer_blocks}
    assert procs == {"CrossAttnRoPEProcessor"}
    g = torch.Generator().manual_seed(0)
    x, states = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 5, 12, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        a = dit(x, torch.tensor(500.0), states, mask, cond_grid=(2, 2))
        b = dit(x, torch.tensor(500.0), states, mask, cond_grid=(1, 4))
    assert not torch.allclose(a, b)  # the grid moves the condition states
    proc = dit.transformer.transformer_blocks[0].attn2.processor
    torch.testing.assert_close(proc.k, rope_cos_sin(condition_positions(mask.sum(1), 5, 720, (1, 4)), 8))


def test_a_head_size_rope_cannot_split_is_refused_when_the_dit_is_built():
    from kelix.dit.model import DiTConfig, KelixDiT
    from tests.dit.conftest import COND_DIM, TINY_SANA

    with pytest.raises(ValueError, match="head size divisible by 4, got 6"):
        KelixDiT(DiTConfig(cond_dim=COND_DIM, cross_attn_rope=True,
                           transformer={**TINY_SANA, "cross_attention_head_dim": 6}))


def test_dropped_items_keep_the_positions_of_their_real_condition():
    """As the release's guidance batch: the null input attends with the real condition's positions."""
    from tests.dit.conftest import tiny_dit

    dit = tiny_dit(cross_attn_rope=True, null_condition_length=6)
    states = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        dit(torch.zeros(2, 4, 4, 4), torch.tensor(10.0), states, mask, drop=torch.tensor([False, True]))
    proc = dit.transformer.transformer_blocks[0].attn2.processor
    # padded to the table's 6 rows; item 1 placed by its 3 real states, not the 6 null rows
    want = condition_positions(torch.tensor([5, 3]), 6, 720)
    torch.testing.assert_close(proc.k, rope_cos_sin(want, 8))
