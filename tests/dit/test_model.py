"""KelixDiT: connector and key mask for variable condition lengths, padding invariance, the null condition,
truncation, save/load round trips, and initialisation from a diffusers SANA directory."""

import json

import pytest
import torch
from torch import nn

from kelix.dit.model import DiTConfig, KelixDiT, load_dit
from tests.dit.conftest import COND_DIM, TINY_SANA, tiny_dit


def inputs(b=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.full((b,), 500.0), torch.randn(b, length, COND_DIM, generator=g))


def test_connector_is_linear_gelu_linear_rmsnorm_into_the_caption_width(dit):
    c = dit.connector
    assert [type(m) for m in c] == [nn.Linear, nn.GELU, nn.Linear, nn.RMSNorm]
    assert (c[0].in_features, c[2].out_features, dit.caption_channels) == (COND_DIM, 16, 16)


def test_condition_and_mask_shapes_for_variable_lengths(dit):
    _, _, states = inputs(length=7)
    mask = torch.arange(7)[None] < torch.tensor([7, 3, 1])[:, None]
    enc, enc_mask = dit.encode_condition(states, mask)
    assert enc.shape == (3, 7, 16) and enc_mask.dtype == torch.bool
    assert enc_mask.sum(1).tolist() == [7, 3, 1]
    enc, enc_mask = dit.encode_condition(states)  # no mask: all real
    assert enc_mask.all()


def test_padding_does_not_change_the_output(dit):
    x, t, states = inputs(b=2, length=7)
    mask = torch.arange(7)[None] < torch.tensor([7, 3])[:, None]
    padded = dit(x, t, states, mask)
    short = dit(x[1:], t[1:], states[1:, :3])
    garbage = states.clone()
    garbage[1, 3:] = 1e3  # padded positions are never attended
    assert padded.shape == (2, 4, 8, 8)
    assert torch.allclose(padded[1:], short, atol=1e-5)
    assert torch.allclose(dit(x, t, garbage, mask), padded, atol=1e-5)


def test_condition_is_cut_to_max_condition_length():
    dit = tiny_dit(max_condition_length=4)
    x, t, states = inputs(length=7)
    assert dit.encode_condition(states)[0].shape[1] == 4
    assert torch.allclose(dit(x, t, states), dit(x, t, states[:, :4]), atol=1e-6)


def test_dropped_items_see_only_the_learned_null_condition(dit):
    x, t, states = inputs(b=2)
    drop = torch.tensor([True, False])
    enc, mask = dit.encode_condition(states, drop=drop)
    assert torch.equal(enc[0, 0], dit.null_condition.detach()) and mask[0].tolist() == [True] + [False] * 6
    assert torch.equal(mask[1], torch.ones(7, dtype=torch.bool))
    out = dit(x, t, states, drop=drop)
    other = dit(x, t, torch.randn_like(states), drop=drop)
    assert torch.allclose(out[0], other[0], atol=1e-6)  # the dropped item ignores its condition
    assert not torch.allclose(out[1], other[1], atol=1e-3)


def test_bad_condition_shape_fails_with_the_expected_shape(dit):
    x, t, _ = inputs()
    with pytest.raises(ValueError, match=rf"must be \[B, L, {COND_DIM}\]"):
        dit(x, t, torch.randn(3, 5, COND_DIM + 1))


def test_save_and_load_round_trip(tmp_path, dit):
    dit.save_pretrained(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["cond_dim"] == COND_DIM and cfg["transformer"]["num_layers"] == 2 and cfg["transformer_path"] is None
    back = load_dit(str(tmp_path / "d"))
    x, t, states = inputs()
    assert torch.equal(back(x, t, states), dit(x, t, states))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_dit(str(tmp_path))


def test_init_from_a_diffusers_sana_directory(tmp_path):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(1)
    SanaTransformer2DModel(**TINY_SANA).save_pretrained(tmp_path / "sana")
    sana = SanaTransformer2DModel.from_pretrained(tmp_path / "sana")
    dit = KelixDiT(DiTConfig(cond_dim=COND_DIM, transformer={"in_channels": 4}, transformer_path=str(tmp_path / "sana")))
    for k, v in sana.state_dict().items():
        assert torch.equal(dit.transformer.state_dict()[k], v), k
    # the saved DiT is self-contained: no path, the full transformer config
    dit.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["transformer_path"] is None and cfg["transformer"]["cross_attention_dim"] == 16
    (tmp_path / "sana" / "config.json").unlink()
    assert torch.equal(load_dit(str(tmp_path / "out")).transformer.proj_out.weight, sana.proj_out.weight)
    with pytest.raises(FileNotFoundError, match="not a local diffusers directory"):
        KelixDiT(DiTConfig(transformer_path=str(tmp_path / "sana")))


def test_transformer_options_must_agree_with_the_pretrained_directory(tmp_path):
    from diffusers import SanaTransformer2DModel

    SanaTransformer2DModel(**TINY_SANA).save_pretrained(tmp_path / "sana")
    with pytest.raises(ValueError, match=r"dit.transformer.in_channels=32 disagrees"):
        KelixDiT(DiTConfig(cond_dim=COND_DIM, transformer={"in_channels": 32}, transformer_path=str(tmp_path / "sana")))


def test_transformer_weights_of_a_variant(tmp_path):
    """A SANA directory with only diffusion_pytorch_model.bf16.safetensors (as SANA's hub repos ship)."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(2)
    sana = SanaTransformer2DModel(**TINY_SANA).to(torch.bfloat16)
    sana.save_pretrained(tmp_path / "sana", variant="bf16")
    assert (tmp_path / "sana" / "diffusion_pytorch_model.bf16.safetensors").is_file()
    with pytest.raises(ValueError, match=r"sana has weights of variant 'bf16', not None: set dit.transformer_variant: bf16"):
        KelixDiT(DiTConfig(cond_dim=COND_DIM, transformer_path=str(tmp_path / "sana")))
    dit = KelixDiT(DiTConfig(cond_dim=COND_DIM, transformer_path=str(tmp_path / "sana"), transformer_variant="bf16"))
    for k, v in sana.state_dict().items():
        assert torch.equal(dit.transformer.state_dict()[k].to(v.dtype), v), k
    assert dit.config.transformer_variant is None  # the saved DiT is self-contained


def test_null_condition_table_gives_dropped_items_its_first_rows():
    """null_condition_length=M (the release's y_embedding): a dropped item attends to the table's rows."""
    d = tiny_dit(null_condition_length=3)
    assert d.null_condition.shape == (3, d.caption_channels)
    states = torch.randn(2, 5, 12)
    drop = torch.tensor([True, False])
    enc, mask = d.encode_condition(states, None, drop)
    assert torch.equal(enc[0, :3], d.null_condition.detach()) and (enc[0, 3:] == 0).all()
    assert mask[0].tolist() == [True, True, True, False, False] and mask[1].all()
    # a shorter condition is padded to the table's rows (the release pads every condition to them)
    enc, mask = d.encode_condition(states[:, :2], None, drop)
    assert torch.equal(enc[0], d.null_condition.detach()) and mask.tolist() == [[True] * 3, [True, True, False]]
    torch.testing.assert_close(enc[1, :2], d.encode_condition(states[1:, :2])[0][0])
    assert (enc[1, 2] == 0).all()


def test_integer_timesteps_truncate():
    d = tiny_dit(integer_timesteps=True)
    x, states = torch.randn(1, 4, 4, 4), torch.randn(1, 3, 12)
    with torch.no_grad():
        a, b, c = (d(x, torch.tensor(t), states) for t in (737.6, 737.0, 738.0))
    assert torch.equal(a, b) and not torch.equal(a, c)
