import pytest
import torch

from kelix.tokenizer.encoder import EncoderConfig, VisionEncoder, _merge_order
from kelix.tokenizer.model import KelixTokenizer, tiny_config


def test_merge_order_groups_2x2_patches_row_major():
    grid = torch.arange(16.0).view(4, 4, 1)
    merged = _merge_order(grid, 2)
    assert merged.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_hf_vision_tower_from_a_local_dir_round_trips(tmp_path, pil_images):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=56, patch_size=14))
    tower.save_pretrained(tmp_path / "siglip")
    cfg = tiny_config(encoder=dict(kind="hf", path=str(tmp_path / "siglip")))
    tok = KelixTokenizer(cfg).eval()
    tok.load_init_weights()
    own, ref = tok.encoder.model.state_dict(), tower.state_dict()
    assert all(torch.equal(own[k], ref[k]) for k in own)
    assert {k for k in ref if k not in own} == {k for k in ref if k.startswith("head.")}  # the unused pooling head
    codes = tok.encode(pil_images)
    tok.save_pretrained(tmp_path / "tok")  # stores the tower's config, not its path
    loaded = KelixTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert loaded.config.encoder.path is None and loaded.config.encoder.hf_config["hidden_size"] == 32
    assert all(torch.equal(a, b) for a, b in zip(codes, loaded.encode(pil_images)))


def test_plain_timm_vit_batches_images_by_size():
    torch.manual_seed(0)
    cfg = EncoderConfig(kind="timm", name="vit_tiny_patch16_224",
                        kwargs=dict(patch_size=14, img_size=56, embed_dim=32, depth=1, num_heads=2, dynamic_img_size=True))
    enc = VisionEncoder(cfg, patch_size=14).eval()
    assert enc.width == 32
    imgs = [torch.randn(3, 56, 84), torch.randn(3, 112, 56), torch.randn(3, 56, 84)]
    together = enc(imgs)
    assert [tuple(g.shape) for g in together] == [(4, 6, 32), (8, 4, 32), (4, 6, 32)]
    torch.testing.assert_close(together[1], enc([imgs[1]])[0])  # the class token is dropped


def test_naflexvit_weights_load_from_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    src = KelixTokenizer(tiny_config()).encoder.model
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    enc = VisionEncoder(EncoderConfig(**{**tiny_config().encoder.__dict__, "path": str(tmp_path / "vit.safetensors")}),
                        patch_size=14)
    enc.load_weights()
    assert all(torch.equal(a, b) for a, b in zip(enc.model.state_dict().values(), src.state_dict().values()))
    enc.config.prefix = "nothing."
    with pytest.raises(KeyError, match="missing"):
        enc.load_weights()


def test_bad_images_and_configs_fail_clearly():
    enc = KelixTokenizer(tiny_config()).encoder
    with pytest.raises(ValueError, match="multiples of 14"):
        enc([torch.randn(3, 50, 56)])
    with pytest.raises(ValueError, match="kind"):
        VisionEncoder(EncoderConfig(kind="keras"), 14)
    with pytest.raises(ValueError, match="NaFlexVit"):
        VisionEncoder(EncoderConfig(kind="naflexvit", name="vit_tiny_patch16_224", kwargs=dict(patch_size=14)), 14)


def _mixing_init(linears: list[torch.nn.Linear], query_keys: list[torch.Tensor]):
    """Weights twice the standard scale (timm starts at std 0.02) and sharper attention logits: the
    attention branches outweigh the residual, so every token's features depend on the other tokens."""
    with torch.no_grad():
        for lin in linears:
            lin.weight.normal_(0, 2 * lin.in_features ** -0.5)
        for w in query_keys:
            w.mul_(1.5)


def _mixes(encode, image: torch.Tensor) -> float:
    """Relative change of the other patches' features when only the last patch's pixels change."""
    other = image.clone()
    other[:, -14:, -14:] += 3.0
    a, b = encode(image).reshape(-1, 32)[:-1], encode(other).reshape(-1, 32)[:-1]
    return float((a - b).norm() / a.norm())


def _native_batch():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, h, w, generator=g) for h, w in [(56, 84), (112, 56), (28 * 3, 28 * 3), (56, 56)]]


def test_naflexvit_padding_mask_keeps_each_image_as_encoded_alone():
    """Images of different sizes share one padded batch; with a ViT whose tokens mix (LayerScale 1,
    sharp attention) each image's features and codes equal those it has alone."""
    torch.manual_seed(0)
    kw = dict(tiny_config().encoder.kwargs, init_values=1.0)
    tok = KelixTokenizer(tiny_config(encoder=dict(kind="naflexvit", name="naflexvit_base_patch16_gap", kwargs=kw))).eval()
    vit = tok.encoder.model
    assert vit.blocks[0].ls1.gamma.detach().eq(1.0).all()  # LayerScale present, not 1e-5
    _mixing_init([lin for b in vit.blocks for lin in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)],
                 [b.attn.qkv.weight[:64] for b in vit.blocks])  # q and k rows of qkv
    pixels = _native_batch()
    with torch.no_grad():
        assert _mixes(lambda x: tok.encoder([x])[0], pixels[1]) > 0.2
        together = tok.encoder(pixels)
        q, _ = tok.quantize(pixels)
        for i, x in enumerate(pixels):
            alone = tok.encoder([x])[0]
            torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-5)
        codes_alone = torch.cat([tok.quantize([x])[0].codes for x in pixels])
    assert torch.equal(q.codes, codes_alone)


def test_siglip_runs_mixed_sizes_in_one_masked_batch_equal_to_transformers_per_image():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, image_size=56, patch_size=14)
    tok = KelixTokenizer(tiny_config(encoder=dict(kind="hf", hf_config=cfg))).eval()
    tower = tok.encoder.model
    assert not hasattr(tower, "head") and not tower.use_head  # the pooling head is not built
    layers = tower.encoder.layers
    _mixing_init([lin for layer in layers for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                  layer.self_attn.v_proj, layer.self_attn.out_proj, layer.mlp.fc1, layer.mlp.fc2)],
                 [p for layer in layers for p in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight)])
    # the reference: transformers' own forward, one image at a time
    ref = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    ref.load_state_dict(tower.state_dict(), strict=False)
    ref.eval()
    calls = []
    tower.encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    pixels = _native_batch()
    with torch.no_grad():
        together = tok.encoder(pixels)
        assert len(calls) == 1  # one encoder pass for four images of three sizes
        for i, x in enumerate(pixels):
            want = ref(pixel_values=x[None], interpolate_pos_encoding=True).last_hidden_state[0]
            torch.testing.assert_close(together[i].reshape(-1, 32), want, rtol=1e-5, atol=1e-5)
        assert _mixes(lambda x: ref(pixel_values=x[None], interpolate_pos_encoding=True).last_hidden_state[0],
                      pixels[1]) > 0.2
        q, _ = tok.quantize(pixels)
        codes_alone = torch.cat([tok.quantize([x])[0].codes for x in pixels])
    assert torch.equal(q.codes, codes_alone)


def test_siglip_exports_with_the_pooling_head_still_load(tmp_path, pil_images):
    import json

    from safetensors.torch import load_file, save_file
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, image_size=56, patch_size=14)
    tok = KelixTokenizer(tiny_config(encoder=dict(kind="hf", hf_config=cfg))).eval()
    tok.save_pretrained(tmp_path)
    # what an export written before the head was dropped holds: the head's tensors and vision_use_head
    sd = load_file(str(tmp_path / "model.safetensors"))
    head = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in cfg.items() if k != "model_type"})).state_dict()
    sd.update({f"encoder.model.{k}": v for k, v in head.items() if k.startswith("head.")})
    save_file(sd, str(tmp_path / "model.safetensors"))
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["encoder"]["hf_config"]["vision_use_head"] = True
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded = KelixTokenizer.from_pretrained(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(tok.encode(pil_images), loaded.encode(pil_images)))
