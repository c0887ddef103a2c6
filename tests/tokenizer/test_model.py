import json

import pytest
import torch

from kelix.tokenizer.model import KelixTokenizer, TokenizerConfig, tiny_config


def test_encode_shapes_follow_native_resolution(tiny_tokenizer, pil_images):
    codes = tiny_tokenizer.encode(pil_images)
    cfg = tiny_tokenizer.image_config
    from kelix.data.images import target_size

    for im, c in zip(pil_images, codes):
        th, tw = target_size(im.height, im.width, cfg)
        assert c.shape == (th // cfg.factor, tw // cfg.factor, 4)
        assert c.dtype == torch.long
        assert int(c.min()) >= 0 and int(c.max()) < 32


def test_padding_in_a_batch_does_not_change_codes(tiny_tokenizer, pil_images):
    together = tiny_tokenizer.encode(pil_images, batch_size=4)
    alone = [tiny_tokenizer.encode([im])[0] for im in pil_images]
    for a, b in zip(together, alone):
        assert torch.equal(a, b)


def test_save_load_round_trip_gives_identical_codes(tiny_tokenizer, tiny_tokenizer_dir, pil_images):
    cfg = json.loads((tiny_tokenizer_dir / "config.json").read_text())
    assert cfg["codebook"] is None and cfg["encoder"]["path"] is None  # portable: no local paths
    loaded = KelixTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert isinstance(loaded.config, TokenizerConfig)
    assert loaded.config.image == tiny_tokenizer.image_config
    for a, b in zip(tiny_tokenizer.encode(pil_images), loaded.encode(pil_images)):
        assert torch.equal(a, b)
    assert torch.equal(loaded.code_vectors(), tiny_tokenizer.code_vectors())


def test_from_pretrained_refuses_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        KelixTokenizer.from_pretrained(str(tmp_path))


def test_embed_codes_equals_forward_embeddings(tiny_tokenizer, pil_images):
    """embed_codes(codes) is exactly what the tokenizer feeds its aux LM for those codes."""
    pixels = tiny_tokenizer.preprocess(pil_images)
    with torch.no_grad():
        out = tiny_tokenizer(pixels)
        again = tiny_tokenizer.embed_codes(out.codes)
        cv = tiny_tokenizer.code_vectors()
    assert again.shape == (out.codes.shape[0], 64)
    torch.testing.assert_close(again, out.embeds, rtol=0, atol=1e-6)
    # code_vectors is what each slot's quantized vector equals
    q, _ = tiny_tokenizer.quantize(pixels)
    assert torch.equal(q.z_q, cv[torch.arange(4), q.codes])
    # per-slot up-projection and sum fusion by hand: sum_j U_j v_j, U_j slot j's column block, no bias
    codes = torch.tensor([[1, 2, 3, 4], [0, 0, 0, 31]])
    w = tiny_tokenizer.up_projector.weight
    assert tiny_tokenizer.up_projector.bias is None and w.shape == (64, 4 * 16)
    manual = sum(cv[j, codes[:, j]] @ w[:, 16 * j:16 * (j + 1)].T for j in range(4))
    torch.testing.assert_close(tiny_tokenizer.embed_codes(codes), manual)


@pytest.mark.parametrize("up_projection", ["per_slot", "shared"])
def test_mean_fusion_and_up_projections_by_hand(up_projection):
    torch.manual_seed(0)
    tok = KelixTokenizer(tiny_config(fusion="mean", up_projection=up_projection)).eval()
    cv, lin = tok.code_vectors(), tok.up_projector
    codes = torch.tensor([[3, 1, 4, 1]])
    v = torch.stack([cv[j, codes[0, j]] for j in range(4)])  # [N, d]
    if up_projection == "shared":  # one Linear(d, out_dim) after fusion (the ablation)
        assert lin.in_features == 16 and lin.out_features == 64
        manual = lin(v.mean(0))
    else:  # mean_j U_j v_j
        manual = sum(lin.weight[:, 16 * j:16 * (j + 1)] @ v[j] for j in range(4)) / 4
    torch.testing.assert_close(tok.embed_codes(codes)[0], manual)
    # slot_projection is the same map as one Linear of the concatenated slots: s * W concat(v) + b
    w, b = tok.slot_projection()
    torch.testing.assert_close(w @ v.flatten() / 4 + b, manual)


def test_per_slot_embeddings_span_more_than_d_dimensions():
    """Per-slot projections let visual embeddings use up to N*d dims; the shared ablation stays in d (+1, the bias)."""
    codes = torch.randint(0, 32, (400, 4), generator=torch.Generator().manual_seed(0))
    rank = {}
    for mode in ("per_slot", "shared"):
        torch.manual_seed(0)
        tok = KelixTokenizer(tiny_config(up_projection=mode)).eval()
        with torch.no_grad():
            sv = torch.linalg.svdvals(tok.embed_codes(codes))
        rank[mode] = int((sv > 1e-4 * sv[0]).sum())  # float32 rounding leaves tiny singular values
    assert rank["shared"] <= 16 + 1
    # LayerNorm leaves each slot's code vectors d-1 free dims: N*(d-1) = 60 of out_dim 64, far above d
    assert rank["per_slot"] >= 4 * (16 - 1)


def test_exports_from_before_per_slot_projections_still_load(tmp_path, pil_images):
    torch.manual_seed(0)
    old = KelixTokenizer(tiny_config(up_projection="shared")).eval()
    old.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["up_projection"], cfg["codebook_form"]  # the config.json such an export has
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = KelixTokenizer.from_pretrained(str(tmp_path))
    assert loaded.config.up_projection == "shared"
    codes = old.encode(pil_images[:2])
    assert all(torch.equal(a, b) for a, b in zip(codes, loaded.encode(pil_images[:2])))
    torch.testing.assert_close(loaded.embed_codes(codes[0]), old.embed_codes(codes[0]), rtol=0, atol=0)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="fsq_levels"):
        TokenizerConfig(quantizer="fsq", K=100, fsq_levels=[8, 8])
    with pytest.raises(ValueError, match="fusion"):
        TokenizerConfig(fusion="max")
    with pytest.raises(ValueError, match="patch size"):
        KelixTokenizer(tiny_config(image=dict(patch_size=16, merge_size=2, min_pixels=64 * 64)))


def test_continuous_baseline_feeds_the_merger_output_to_the_up_projector():
    """quantizer: none (Table 6a): no slots, no d-dim bottleneck: embeds = up_projector(merger(encoder(x)))."""
    torch.manual_seed(0)
    tok = KelixTokenizer(tiny_config(quantizer="none"))
    assert tok.up_projector.in_features == 64 and not list(tok.quantizer.parameters())  # merger_dim
    pixels = [torch.randn(3, 56, 84), torch.randn(3, 112, 56)]
    out = tok(pixels)
    feats, grids = tok.merger(tok.encoder(pixels))
    assert out.codes is None and grids == out.grids and float(out.loss) == 0
    torch.testing.assert_close(out.embeds, feats @ tok.up_projector.weight.T + tok.up_projector.bias, rtol=0, atol=1e-6)
    sv = torch.linalg.svdvals(tok.up_projector.weight.detach())
    assert int((sv > 1e-4 * sv[0]).sum()) == 64  # full-width map: more than the d=16 of the quantized paths


@pytest.mark.parametrize("quantizer", ["pq", "shared", "rvq"])
def test_inference_copy_stores_the_projected_codebook_not_the_centroids(quantizer, tmp_path, pil_images):
    torch.manual_seed(0)
    tok = KelixTokenizer(tiny_config(quantizer=quantizer, centroid_dim=96)).eval()
    small = tok.for_inference()
    assert small.config.codebook_form == "table"
    sd = small.state_dict()
    assert "quantizer.codebook.vectors" in sd and not any("centroids" in k for k in sd)
    small.save_pretrained(tmp_path)
    loaded = KelixTokenizer.from_pretrained(str(tmp_path))
    assert torch.equal(loaded.code_vectors(), tok.code_vectors())
    codes = tok.encode(pil_images)
    assert all(torch.equal(a, b) for a, b in zip(codes, loaded.encode(pil_images)))
    torch.testing.assert_close(loaded.embed_codes(codes[1]), tok.embed_codes(codes[1]), rtol=0, atol=0)
    size = sum(v.numel() for k, v in sd.items() if k.startswith("quantizer.codebook."))
    assert size < sum(v.numel() for k, v in tok.state_dict().items() if k.startswith("quantizer.codebook.")) / 4
    with pytest.raises(ValueError, match="simvq"):
        loaded.quantizer.fit_codebook(torch.randn(64, 64))
