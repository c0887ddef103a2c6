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
    assert all(torch.equal(own[k], ref[k]) for k in ref)
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
