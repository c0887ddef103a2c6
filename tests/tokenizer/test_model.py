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
    # sum fusion by hand
    codes = torch.tensor([[1, 2, 3, 4], [0, 0, 0, 31]])
    manual = tiny_tokenizer.up_projector(sum(cv[j, codes[:, j]] for j in range(4)))
    torch.testing.assert_close(tiny_tokenizer.embed_codes(codes), manual)


def test_mean_fusion_and_up_projector_is_linear():
    torch.manual_seed(0)
    tok = KelixTokenizer(tiny_config(fusion="mean")).eval()
    assert isinstance(tok.up_projector, torch.nn.Linear)
    assert tok.up_projector.in_features == 16 and tok.up_projector.out_features == 64
    cv = tok.code_vectors()
    codes = torch.tensor([[3, 1, 4, 1]])
    manual = tok.up_projector(torch.stack([cv[j, codes[0, j]] for j in range(4)]).mean(0))
    torch.testing.assert_close(tok.embed_codes(codes)[0], manual)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="fsq_levels"):
        TokenizerConfig(quantizer="fsq", K=100, fsq_levels=[8, 8])
    with pytest.raises(ValueError, match="fusion"):
        TokenizerConfig(fusion="max")
    with pytest.raises(ValueError, match="patch size"):
        KelixTokenizer(tiny_config(image=dict(patch_size=16, merge_size=2, min_pixels=64 * 64)))
