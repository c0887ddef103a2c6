"""The converted release computes what the official implementation computed (reference tensors),
read back from the bf16 release in float32: codes exactly, everything else to 1e-5."""

from __future__ import annotations

import torch

from kelix.official.layout import blocks_from_expanded, expanded_from_blocks, official_decoder_outputs

TOL = 1e-5


def close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a.float() - b.float()).abs().max().item()
    assert err <= TOL, f"{what}: max abs error {err:.3g} > {TOL}"


def _grid(meta):
    t, h, w = meta["tokenizer"]["grid_thw"]
    return h, w


@torch.no_grad()
def test_tokenizer_parity(kit_tokenizer, reference):
    meta, ref = reference
    tok = kit_tokenizer
    px = ref["tok.pixel_values"]  # [h*w, 3, p, p] row-major patches
    h, w = _grid(meta)
    p = px.shape[-1]
    image = px.reshape(h, w, 3, p, p).permute(2, 0, 3, 1, 4).reshape(3, h * p, w * p)
    (vit,) = tok.encoder([image])
    close(vit.reshape(h * w, -1), ref["tok.vit_last_hidden"], "ViT output")
    merged, grids = tok.merger([vit])
    assert grids == [tuple(meta["tokenizer"]["merged_grid"])]
    close(merged, ref["tok.merged"], "merged features")
    z_e = tok.quantizer.proj_in(merged).view(merged.shape[0], tok.config.N, -1)
    close(z_e, ref["tok.z_e"], "sub-vectors before their LayerNorm")
    q, _ = tok.quantize([image])
    assert torch.equal(q.codes, ref["tok.codes"].long()), "codes"
    assert q.codes.tolist() == meta["tokenizer"]["codes"]
    close(tok.code_vectors(), ref["tok.code_vectors"], "code vectors")
    close(tok.up_project(q.z_q), ref["tok.fused_embeds"], "fused embeddings")


@torch.no_grad()
def test_llm_hidden_states_and_slot_logits(kit_lm, reference):
    meta, ref = reference
    lm, vocab = kit_lm, kit_lm.vocab
    expanded = ref["llm.expanded_ids"].long()
    tokens, codes = blocks_from_expanded(expanded, vocab)
    assert torch.equal(expanded_from_blocks(tokens, codes, vocab), expanded)
    h, _ = lm.hidden(lm.embed_blocks(tokens[None], codes[None]))
    close(h[0], ref["llm.hidden_prenorm"], "LLM pre-norm hidden states")

    out = official_decoder_outputs(lm, h[0], expanded)  # [L, N+1, D]
    logits = ref["llm.logits"]  # [L, N+1, V+S] over the whole vocabulary
    N, L = vocab.N, expanded.shape[0]
    checked = 0
    for i in range(L - 1):  # the last position wraps around in the release: ignored
        nxt = expanded[i + 1]
        visual = bool(vocab.is_visual(nxt[:1]).item())
        for j in range(N + 1):
            if j == 0:
                lo, hi = vocab.slot_range(0)
                mine = lm.slot_logits(out[i, 0], 0)
                keep = torch.ones(hi - lo, dtype=torch.bool)
                keep[[b - lo for b in vocab.slot0_banned()]] = False  # -inf in the kit: never legal in slot 0
                close(mine[keep], logits[i, 0, lo:hi][keep], f"block {i + 1} slot 0")
            elif visual and j < N:
                lo, hi = vocab.slot_ranges("visual")[j]
                close(lm.slot_logits(out[i, j], j, "visual"), logits[i, j, lo:hi], f"block {i + 1} slot {j}")
            else:  # the end-of-block slot: its one legal id
                eob = torch.nn.functional.linear(lm.final_norm(out[i, j]), lm.lm_head.weight[vocab.eob:vocab.eob + 1])
                close(eob, logits[i, j, vocab.eob:vocab.eob + 1], f"block {i + 1} slot {j} (eob)")
            checked += 1
    assert checked == (L - 1) * (N + 1)


@torch.no_grad()
def test_kit_teacher_forcing_matches_official_slots(kit_lm, reference):
    """The kit's own forward (codes slots only, eob implied) gives the official logits of those slots."""
    _, ref = reference
    lm, vocab = kit_lm, kit_lm.vocab
    expanded = ref["llm.expanded_ids"].long()
    tokens, codes = blocks_from_expanded(expanded, vocab)
    L = tokens.shape[0]
    targets = torch.ones(1, L, dtype=torch.bool)
    pred = lm(tokens[None], codes[None], None, targets, return_logits=True)
    lo, hi = vocab.slot_range(0)
    keep = torch.ones(hi - lo, dtype=torch.bool)
    keep[[b - lo for b in vocab.slot0_banned()]] = False
    pos = pred.where[1]
    close(pred.logits0[:, keep], ref["llm.logits"][pos, 0, lo:hi][:, keep], "kit forward slot 0")
    vis_pos = pos[pred.is_visual]
    for j in range(1, vocab.N):
        lo, hi = vocab.slot_ranges("visual")[j]
        close(pred.code_logits[:, j - 1], ref["llm.logits"][vis_pos, j, lo:hi], f"kit forward slot {j}")


def test_keye_encoder_on_transformers_4_says_so_in_one_line(monkeypatch):
    import sys
    import types

    from kelix.tokenizer.encoder import EncoderConfig, VisionEncoder
    from kelix.tokenizer.navit import keye_vit_config

    old = types.ModuleType("transformers")  # a transformers 4.x: no PaddleOCRVisionModel
    old.__version__ = "4.56.2"
    monkeypatch.setitem(sys.modules, "transformers", old)
    cfg = EncoderConfig(kind="keye", hf_config=keye_vit_config(32, 48, 1, 2, 56, 14))
    import pytest

    with pytest.raises(ImportError) as e:
        VisionEncoder(cfg, 14)
    assert "transformers >= 5" in str(e.value) and "4.56.2" in str(e.value) and "\n" not in str(e.value)
