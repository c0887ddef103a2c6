"""The released Kelix-DiT in the kit: parity with the official implementation's outputs, strict conversion,
the round trip back to the official layout, and the release's options (cross-attention RoPE, sampler).

The fixture directory comes from ``KELIX_OFFICIAL_FIXTURE`` (default: the project's copy); nothing here
depends on its sizes.
"""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

FIXTURE = Path(os.environ.get("KELIX_OFFICIAL_FIXTURE", Path(__file__).parents[1] / "fixtures" / "official"))
TOL = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def ref():
    return load_file(FIXTURE / "reference.safetensors"), json.loads((FIXTURE / "reference.json").read_text())


@pytest.fixture(scope="module")
def dit():
    from kelix.official.dit import dit_from_official

    return dit_from_official(str(FIXTURE / "dit"))


def _velocity(dit, ref, timestep=None, **kw):
    t, info = ref
    step = torch.tensor(info["dit"]["timestep"] if timestep is None else timestep)
    with torch.no_grad():
        return dit(t["dit.x"][None], step, t["dit.cond_states"][None], t["dit.cond_mask"][None].bool(),
                   cond_grid=info["tokenizer"]["merged_grid"], **kw)[0]


def test_connector_and_velocity_match_the_official_dit(dit, ref):
    t, _ = ref
    with torch.no_grad():
        connected = dit.connector(t["dit.cond_states"][None])[0]
    torch.testing.assert_close(connected, t["dit.connected"], **TOL)
    torch.testing.assert_close(_velocity(dit, ref), t["dit.velocity"], **TOL)


def test_timestep_is_truncated_like_the_release(dit, ref):
    """The release sees 737.6 as 737 (``reference.json`` dit.same_as_timestep_737 = 0)."""
    _, info = ref
    step = info["dit"]["timestep"]
    assert info["dit"]["same_as_timestep_737"] == 0.0
    assert torch.equal(_velocity(dit, ref), _velocity(dit, ref, timestep=float(math.trunc(step))))
    assert not torch.equal(_velocity(dit, ref), _velocity(dit, ref, timestep=float(math.trunc(step)) + 1))


def test_condition_grid_is_the_releases(ref):
    """The positions of the fixture's condition lie on the release's grid (reference.json dit.cond_grid)."""
    from kelix.dit.rope import condition_positions

    t, info = ref
    n = int(t["dit.cond_mask"].sum())
    pos = condition_positions(torch.tensor([n]), t["dit.cond_mask"].shape[0], info["dit"]["max_len"],
                              info["tokenizer"]["merged_grid"])[0]
    h, w = info["dit"]["cond_grid"]
    i = torch.arange(min(h * w, pos.shape[0]))
    assert torch.equal(pos[: len(i)], torch.stack([i // w, i % w], -1))
    assert (pos[len(i):] == 0).all()


def test_round_trip_is_byte_identical(dit):
    from kelix.official.dit import UNUSED_KEYS, dit_to_official

    original = load_file(FIXTURE / "dit" / "model.safetensors")
    base = json.loads((FIXTURE / "dit" / "config.json").read_text())
    config, state = dit_to_official(dit, base_config=base)
    assert set(state) == set(original)
    for k, v in original.items():
        if k in UNUSED_KEYS:
            assert state[k].shape == v.shape and not state[k].any()  # regenerated: zeros
            continue
        assert state[k].dtype == v.dtype and state[k].shape == v.shape, k
        assert state[k].contiguous().view(torch.uint8).numpy().tobytes() == v.view(torch.uint8).numpy().tobytes(), k
    assert set(config) == set(base)
    assert config["model_max_length"] == original["y_embedder.y_embedding"].shape[0]
    assert {k: v for k, v in config.items() if k != "model_max_length"} == \
        {k: v for k, v in base.items() if k != "model_max_length"}


def test_written_back_directory_converts_again(dit, ref, tmp_path):
    from kelix.official.dit import dit_from_official, dit_to_official

    config, state = dit_to_official(dit)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    again = dit_from_official(str(tmp_path))
    torch.testing.assert_close(_velocity(again, ref), ref[0]["dit.velocity"], **TOL)


def test_saved_kit_dit_keeps_the_release_options(dit, ref, tmp_path):
    from kelix.dit.model import load_dit

    dit.save_pretrained(tmp_path)
    back = load_dit(str(tmp_path)).eval()
    assert back.config.cross_attn_rope and back.config.integer_timesteps
    assert torch.equal(_velocity(back, ref), _velocity(dit, ref))


def _copy_with(tmp_path, edit_state=None, edit_config=None) -> str:
    out = tmp_path / "dit"
    shutil.copytree(FIXTURE / "dit", out)
    if edit_state:
        sd = load_file(out / "model.safetensors")
        edit_state(sd)
        save_file(sd, out / "model.safetensors")
    if edit_config:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def test_missing_key_is_refused_with_its_name(tmp_path):
    from kelix.official.dit import dit_from_official

    path = _copy_with(tmp_path, edit_state=lambda sd: sd.pop("blocks.0.cross_attn.to_k.bias"))
    with pytest.raises(KeyError, match="missing key 'blocks.0.cross_attn.to_k.bias'"):
        dit_from_official(path)


def test_extra_key_is_refused_with_its_name(tmp_path):
    from kelix.official.dit import dit_from_official

    path = _copy_with(tmp_path, edit_state=lambda sd: sd.update({"blocks.0.attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(KeyError, match="unexpected key 'blocks.0.attn.extra.weight'"):
        dit_from_official(path)


def test_wrong_shape_is_refused_with_its_name(tmp_path):
    from kelix.official.dit import dit_from_official

    def one_row_more(sd):  # wrong whatever the fixture's sizes
        w = sd["t_embedder.mlp.0.weight"]
        sd["t_embedder.mlp.0.weight"] = torch.cat([w, w[:1]])

    path = _copy_with(tmp_path, edit_state=one_row_more)
    with pytest.raises(ValueError, match="key 't_embedder.mlp.0.weight' has shape"):
        dit_from_official(path)


@pytest.mark.parametrize("field, value, message", [
    ("brand_new_field", 1, "unknown config field 'brand_new_field'"),
    ("use_pe", True, "use_pe=True is not supported"),
    ("model_class", "SanaMSModel", "model_class is 'SanaMSModel'"),
])
def test_config_fields_are_checked(tmp_path, field, value, message):
    from kelix.official.dit import dit_from_official

    path = _copy_with(tmp_path, edit_config=lambda c: c.update({field: value}))
    with pytest.raises(ValueError, match=message):
        dit_from_official(path)


def test_a_kit_dit_without_the_release_options_is_refused_by_to_official():
    from kelix.dit.model import DiTConfig, KelixDiT
    from kelix.official.dit import dit_to_official

    tiny = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                caption_channels=16, sample_size=4)
    with pytest.raises(ValueError, match="dit.integer_timesteps"):
        dit_to_official(KelixDiT(DiTConfig(cond_dim=8, transformer=tiny)))


def test_export_writes_a_detokenizer_directory(dit, ref, tmp_path):
    from kelix.dit.export import load_detokenizer, save_vae
    from kelix.dit.sampler import RELEASE_SAMPLING
    from kelix.dit.vae import VAEConfig, load_vae
    from kelix.official.dit import export_official_dit

    channels = ref[0]["dit.x"].shape[0]
    vae_dir = tmp_path / "vae"
    save_vae(load_vae(VAEConfig(config={**VAEConfig().config, "latent_channels": channels})), str(vae_dir))
    out = export_official_dit(str(FIXTURE / "dit"), str(vae_dir), str(tmp_path / "dit_out"))
    detok = load_detokenizer(out)
    assert detok.flow.shift == RELEASE_SAMPLING["shift"]
    torch.testing.assert_close(_velocity(detok.dit.eval(), ref), ref[0]["dit.velocity"], **TOL)
    t, _ = ref
    images = detok.generate(t["dit.cond_states"][None], t["dit.cond_mask"][None].bool(), image_size=16,
                            steps=2, cfg_scale=RELEASE_SAMPLING["cfg_scale"],
                            sigma_schedule=RELEASE_SAMPLING["sigma_schedule"])
    assert images.shape == (1, 3, 16, 16) and images.isfinite().all()
    wrong = tmp_path / "vae_wrong"
    save_vae(load_vae(VAEConfig(config={**VAEConfig().config, "latent_channels": channels + 1})), str(wrong))
    with pytest.raises(ValueError, match="latent channels"):
        export_official_dit(str(FIXTURE / "dit"), str(wrong), str(tmp_path / "never"))
