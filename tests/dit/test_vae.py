"""The frozen VAE: loading AutoencoderDC / AutoencoderKL from a local directory, latent scaling both ways."""

import pytest
import torch

from kelix.dit.vae import TINY_DCAE, FrozenVAE, VAEConfig, load_vae

TINY_KL = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1)


def pixels(b=2, size=16):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_dc_vae_through_a_saved_directory_applies_the_scaling_factor(tmp_path):
    vae = load_vae(VAEConfig(config=dict(TINY_DCAE, scaling_factor=0.5)))
    assert (vae.downsample, vae.latent_channels, vae.scaling_factor) == (4, 4, 0.5)
    assert not any(p.requires_grad for p in vae.parameters())
    vae.vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(VAEConfig(path=str(tmp_path / "vae")))
    x = pixels()
    z = loaded.encode(x)
    assert z.shape == (2, 4, 4, 4)
    assert torch.allclose(z, vae.vae.encode(x).latent * 0.5, atol=1e-6)
    assert torch.allclose(loaded.decode(z), vae.vae.decode(z / 0.5).sample.clamp(-1, 1), atol=1e-6)


def test_random_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = load_vae(VAEConfig(seed=3)), load_vae(VAEConfig(seed=3))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_kl_vae_uses_the_posterior_mode_shift_and_scale():
    vae = load_vae(VAEConfig(kind="kl", config=dict(TINY_KL, scaling_factor=2.0, shift_factor=0.1)))
    assert isinstance(vae, FrozenVAE) and (vae.downsample, vae.shift_factor) == (2, 0.1)
    x = pixels(size=8)
    mode = vae.vae.encode(x).latent_dist.mode()
    assert torch.allclose(vae.encode(x), (mode - 0.1) * 2.0, atol=1e-6)
    overridden = load_vae(VAEConfig(kind="kl", config=TINY_KL, scaling_factor=3.0))
    assert overridden.scaling_factor == 3.0


def test_bad_input_fails_early(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local diffusers VAE directory"):
        load_vae(VAEConfig(path=str(tmp_path)))
    with pytest.raises(ValueError, match="kind 'vq'"):
        VAEConfig(kind="vq")
    with pytest.raises(ValueError, match="not a valid AutoencoderDC config"):
        load_vae(VAEConfig(config={"no_such_option": 1}))
    with pytest.raises(ValueError, match="not a multiple of the VAE's downsampling 4"):
        load_vae(VAEConfig()).encode(pixels(size=10))


def test_pixel_autoencoder_is_exact_and_round_trips(tmp_path):
    from kelix.dit.export import save_vae
    from kelix.dit.vae import VAEConfig, load_vae

    vae = load_vae(VAEConfig(kind="pixel", config={"patch_size": 2}, shift_factor=0.5, scaling_factor=2.0))
    x = torch.rand(2, 3, 8, 12) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 12, 4, 6) and (vae.downsample, vae.latent_channels) == (2, 12)
    assert torch.allclose(z[0, ::4, 0, 0], (x[0, :, 0, 0] - 0.5) * 2.0)  # channel 4c: pixel (0, 0) of colour c
    assert torch.equal(vae.decode(z), x)
    save_vae(vae, str(tmp_path / "vae"))
    again = load_vae(VAEConfig(path=str(tmp_path / "vae")))
    assert (again.scaling_factor, again.shift_factor, again.downsample) == (2.0, 0.5, 2)
    assert torch.equal(again.decode(again.encode(x)), x)


def test_a_dc_shift_factor_override_survives_the_export(tmp_path, capfd):
    """AutoencoderDC has no shift_factor option: the export keeps the override beside the VAE's config."""
    from kelix.dit.export import load_detokenizer, write_export
    from tests.dit.conftest import tiny_dit

    vae = load_vae(VAEConfig(shift_factor=0.3, scaling_factor=0.7))
    x = pixels()
    assert torch.allclose(vae.encode(x), (vae.vae.encode(x).latent - 0.3) * 0.7, atol=1e-6)
    write_export(tiny_dit(), vae, {}, str(tmp_path / "det"))
    back = load_detokenizer(str(tmp_path / "det")).vae
    assert (back.shift_factor, back.scaling_factor) == (0.3, 0.7)
    assert torch.equal(back.encode(x), vae.encode(x)) and torch.equal(back.decode(vae.encode(x)), vae.decode(vae.encode(x)))
    assert "not expected" not in capfd.readouterr().err  # the diffusers config stays a plain AutoencoderDC's
    overridden = load_vae(VAEConfig(path=str(tmp_path / "det" / "vae"), shift_factor=0.1))
    assert overridden.shift_factor == 0.1  # an explicit override still wins


def test_latents_mean_and_std_are_applied_as_diffusers_pipelines_do(tmp_path):
    from kelix.dit.export import save_vae

    mean, std = [0.1, -0.2, 0.3, 0.05], [0.5, 2.0, 1.5, 0.8]
    vae = load_vae(VAEConfig(kind="kl", config=dict(TINY_KL, scaling_factor=0.5, latents_mean=mean, latents_std=std)))
    x = pixels(size=8)
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    z = vae.vae.encode(x).latent_dist.mode()
    # diffusers' SDXL img2img prepare_latents, then the SDXL pipeline's decode
    assert torch.allclose(vae.encode(x), (z - m) * 0.5 / s, atol=1e-6)
    lat = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(vae.decode(lat), vae.vae.decode(lat * s / 0.5 + m).sample.clamp(-1, 1), atol=1e-6)
    save_vae(vae, str(tmp_path / "vae"))
    back = load_vae(VAEConfig(path=str(tmp_path / "vae")))
    assert back.latents_mean == mean and torch.equal(back.encode(x), vae.encode(x))
    with pytest.raises(ValueError, match="latents_mean/latents_std have 2/2 values for 4 latent channels"):
        load_vae(VAEConfig(kind="kl", config=dict(TINY_KL, latents_mean=[0, 0], latents_std=[1, 1])))
    with pytest.raises(ValueError, match="shift_factor 0.1 and latents_mean both set"):
        load_vae(VAEConfig(kind="kl", config=dict(TINY_KL, shift_factor=0.1, latents_mean=mean, latents_std=std)))


def test_vae_weights_of_a_variant(tmp_path):
    from diffusers import AutoencoderDC

    torch.manual_seed(4)
    dc = AutoencoderDC(**TINY_DCAE).to(torch.bfloat16)
    dc.save_pretrained(tmp_path / "vae", variant="bf16")
    with pytest.raises(ValueError, match=r"vae has weights of variant 'bf16', not None: set vae.variant: bf16"):
        load_vae(VAEConfig(path=str(tmp_path / "vae")))
    vae = load_vae(VAEConfig(path=str(tmp_path / "vae"), variant="bf16", dtype="bfloat16"))
    assert vae.dtype == torch.bfloat16
    for k, v in dc.state_dict().items():
        assert torch.equal(vae.vae.state_dict()[k], v), k
    with pytest.raises(ValueError, match="not 'fp16'"):
        load_vae(VAEConfig(path=str(tmp_path / "vae"), variant="fp16"))
