"""DiTModule: training lowers the loss on a fixed batch, validation is deterministic per sigma bucket,
mismatched parts fail at construction, and `kelix fit` logs losses, sample grids and a checkpoint with
EMA weights that `kelix export-dit` turns into a loadable de-tokenizer."""

import pytest
import torch
import yaml

from kelix.dit.flow import bucket_names
from tests.dit.conftest import COND_DIM, TINY_SANA, tiny_config, tiny_module


def fixed_batch(b=4, pixels=False):
    g = torch.Generator().manual_seed(0)
    # pixels as DiTProcessor gives them: uint8, normalised on the device
    target = {"pixels": torch.randint(0, 256, (b, 3, 16, 16), generator=g, dtype=torch.uint8)} if pixels else {
        "latents": torch.randn(b, 4, 8, 8, generator=g)}
    return {**target, "batch_size": b,
            "prompts": ["a red circle", "a blue square on a gray background", "two green triangles", "x"][:b]}


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    m = tiny_module(cond_dropout=0.0)
    opt = torch.optim.AdamW(m.dit.parameters(), lr=3e-3)
    batch, losses = fixed_batch(), []
    for _ in range(25):
        m._gen = torch.Generator().manual_seed(0)  # same sigmas and noise every step: a fixed objective
        out = m.step(batch, "train")
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert {"latent_std", "cond_len"} <= set(out) and "cond_dropped" not in out
    assert out["cond_len"].item() == pytest.approx(sum(len(p) for p in batch["prompts"]) / 4)


def test_uint8_pixels_are_normalised_on_the_device_before_the_vae():
    m = tiny_module()
    b = fixed_batch(pixels=True)
    with torch.no_grad():
        want = m.frozen.vae.encode(b["pixels"].float() / 127.5 - 1.0)  # [-1, 1], the VAE's range
        got = m.latents_of(b)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert float(want.std()) > 0.1


def test_validation_evaluates_every_bucket_with_fixed_noise():
    m = tiny_module()
    with torch.no_grad():
        a, b = m.step(fixed_batch(pixels=True), "val"), m.step(fixed_batch(pixels=True), "val")
    assert set(bucket_names(4)) <= set(a) and "cond_dropped" not in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.isclose(a["loss"], torch.stack([a[k] for k in bucket_names(4)]).mean())


def test_validation_loss_uses_the_ema_weights_by_default():
    m, live = tiny_module(), tiny_module(val_weights="live")
    with torch.no_grad():  # the live weights move away from the EMA, as after training steps
        for net in (m.dit, live.dit):
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    batch = fixed_batch()
    with torch.no_grad():
        got, got_live = m.step(batch, "val")["loss"], live.step(batch, "val")["loss"]
        # by hand: every item at each bucket centre, noise of seed 0, MSE of the EMA's velocity to noise - x0
        x0, b = batch["latents"], 4
        sigma = (torch.arange(4.0) + 0.5).div(4).repeat_interleave(b)
        noise = torch.randn((4 * b, *x0.shape[1:]), generator=torch.Generator().manual_seed(0))
        x0 = x0.repeat(4, 1, 1, 1)
        states, mask = m.frozen.condition(batch)
        s = sigma.view(-1, 1, 1, 1)
        want = [(net(((1 - s) * x0 + s * noise), sigma * 1000, states.repeat(4, 1, 1), mask.repeat(4, 1))
                 - (noise - x0)).pow(2).mean() for net in (m.ema, m.dit)]
    assert torch.allclose(got, want[0], rtol=1e-5) and torch.allclose(got_live, want[1], rtol=1e-5)
    assert not torch.allclose(want[0], want[1], rtol=1e-3)
    with pytest.raises(ValueError, match="val_weights 'best'"):
        tiny_module(val_weights="best")


def test_condition_dropout_uses_the_null_condition():
    m = tiny_module(cond_dropout=0.5)
    m._gen = torch.Generator().manual_seed(1)
    out = m.step(fixed_batch(), "train")
    assert 0 < out["cond_dropped"].item() < 1


def test_mismatched_parts_fail_at_construction():
    from kelix.dit.conditions import PromptBytesConditions
    from kelix.dit.model import DiTConfig
    from kelix.dit.module import DiTModule

    with pytest.raises(ValueError, match="in_channels=8 but the VAE has 4 latent channels"):
        DiTModule(dit=DiTConfig(cond_dim=COND_DIM, transformer=dict(TINY_SANA, in_channels=8, out_channels=8)))
    with pytest.raises(ValueError, match=r"cond_dim=12 but the condition provider PromptBytesConditions gives width 8"):
        DiTModule(dit=tiny_config(), condition=PromptBytesConditions(8))
    with pytest.raises(ValueError, match="cond_dropout"):
        tiny_module(cond_dropout=1.0)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, synthetic_dir):
    """A 4-step `kelix fit` of a tiny DiT on synthetic caption + t2i shards."""
    import os

    from kelix.cli import main

    tmp = tmp_path_factory.mktemp("fit")
    cfg = {
        "model": {"class_path": "kelix.dit.module.DiTModule", "init_args": {
            "dit": {"cond_dim": COND_DIM, "transformer": TINY_SANA},
            "condition": {"class_path": "kelix.dit.conditions.PromptBytesConditions", "init_args": {"dim": COND_DIM}},
            "ema_decay": 0.5, "sample_every_n_steps": 2, "num_samples": 2, "sample_steps": 2, "sample_cfg": 2.0,
            "export_dir": str(tmp / "export"), "optim": {"lr": 1e-3, "schedule": "constant"}}},
        "data": {"class_path": "kelix.data.datamodule.ShardDataModule", "init_args": {
            "train": [str(synthetic_dir / "caption-00000.tar"), str(synthetic_dir / "t2i-00000.tar")],
            "val": str(synthetic_dir / "t2i-00001.tar"),
            "processor": {"class_path": "kelix.dit.data.DiTProcessor",
                          "init_args": {"target_size": 16, "condition": "prompt"}},
            "batch_size": 4, "num_workers": 0, "shuffle_buffer": 4}},
        "trainer": {"max_steps": 4, "accelerator": "cpu", "log_every_n_steps": 1, "val_check_interval": 4,
                    "limit_val_batches": 1, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False},
    }
    (tmp / "tiny_dit.yaml").write_text(yaml.safe_dump(cfg))
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        main(["fit", "--config", "tiny_dit.yaml"])
    finally:
        os.chdir(cwd)
    return tmp / "runs" / "tiny_dit" / "version_0"


def test_fit_logs_losses_buckets_and_sample_grids(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(fitted), size_guidance={"images": 0}).Reload()
    scalars = set(ev.Tags()["scalars"])
    assert {"train/loss", "train/latent_std", "val/loss", *(f"val/{k}" for k in bucket_names(4))} <= scalars
    images = ev.Images("samples/ema_cfg2_steps2")
    assert [i.step for i in images] == [2, 4]
    assert (images[0].height, images[0].width) == (32, 32)  # [reconstructions; samples] x 2 images of 16 px


def test_checkpoint_holds_ema_weights_and_configs(fitted):
    ckpt = torch.load(fitted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    assert ckpt["kelix_dit"]["dit"]["cond_dim"] == COND_DIM and ckpt["kelix_dit"]["ema_step"] == 4
    assert not any(k.startswith(("frozen", "vae", "condition")) for k in sd)  # frozen parts are not saved
    key = "connector.0.weight"
    assert not torch.equal(sd[f"ema.{key}"], sd[f"dit.{key}"])


def test_export_and_load_the_detokenizer(fitted, tmp_path):
    from kelix.dit.export import load_detokenizer, main
    from kelix.dit.module import DiTModule

    assert main(["--ckpt", str(fitted / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "out")]) == 0
    det = load_detokenizer(str(tmp_path / "out"))
    at_end = load_detokenizer(str(fitted.parents[2] / "export"))  # export_dir: written when fit ended
    assert all(torch.equal(v, at_end.dit.state_dict()[k]) for k, v in det.dit.state_dict().items())
    ckpt = torch.load(fitted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for k, v in det.dit.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][f"ema.{k}"]), k
    assert det.flow.shift == 3.0 and det.vae.downsample == 4
    states = torch.randn(1, 5, COND_DIM)
    img = det.generate(states, image_size=16, steps=2, cfg_scale=1.0)
    assert img.shape == (1, 3, 16, 16)
    # a later stage starts from the export: weights and EMA both
    m = DiTModule(dit=tiny_config(), init_from=str(tmp_path / "out"), condition=None)
    assert torch.equal(m.dit.connector[0].weight, det.dit.connector[0].weight)
    assert torch.equal(m.ema.connector[0].weight, det.dit.connector[0].weight)


def test_with_an_ema_fit_exports_the_live_weights_beside_it(fitted):
    from kelix.dit.export import load_detokenizer

    ckpt = torch.load(fitted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    live = load_detokenizer(str(fitted.parents[2] / "export_live"))
    for k, v in live.dit.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][f"dit.{k}"]), k


def test_without_an_ema_there_is_one_copy_and_everything_uses_it(tmp_path):
    from kelix.dit.export import export, load_detokenizer

    m = tiny_module(ema_decay=None)
    assert m.ema is None and m.averaged is m.dit and m.parallel_blocks() == m.dit.blocks()
    with torch.no_grad():
        assert torch.equal(m.step(fixed_batch(), "val")["loss"],
                           tiny_module(ema_decay=None, val_weights="live").step(fixed_batch(), "val")["loss"])
    m.export(str(tmp_path / "out"))
    got = load_detokenizer(str(tmp_path / "out")).dit.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in m.dit.state_dict().items())
    # export-dit of its checkpoint: the default (ema) weights are the live ones
    ckpt = {"state_dict": {f"dit.{k}": v for k, v in m.dit.state_dict().items()}, "kelix_dit": {}}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "no_ema.ckpt")
    export(str(tmp_path / "no_ema.ckpt"), str(tmp_path / "out2"), with_vae=False)
    from safetensors.torch import load_file

    again = load_file(str(tmp_path / "out2" / "model.safetensors"))
    assert all(torch.equal(v, again[k]) for k, v in m.dit.state_dict().items())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_export_reads_a_sharded_checkpoint_directory(fitted, tmp_path):
    import torch.distributed.checkpoint as dcp

    from kelix.dit.export import export, read_checkpoint

    ckpt = torch.load(fitted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    sharded = tmp_path / "sharded.ckpt"  # the layout FSDP2Strategy writes: DCP files + meta.pt
    dcp.save({"state_dict": ckpt.pop("state_dict")}, checkpoint_id=str(sharded), no_dist=True)
    ckpt.pop("optimizer_states", None)
    torch.save(ckpt, sharded / "meta.pt")
    meta, live = read_checkpoint(str(sharded), "live")
    assert meta["dit"]["cond_dim"] == COND_DIM and "connector.0.weight" in live
    export(str(sharded), str(tmp_path / "out"), with_vae=False)
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "vae").exists()


def test_condition_dropout_drops_its_share_of_the_batch():
    b = 64
    batch = {"latents": torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(0)), "batch_size": b,
             "prompts": ["a red circle"] * b}
    for p, low, high in ((0.25, 0.1, 0.4), (0.9, 0.75, 1.0)):
        m = tiny_module(cond_dropout=p)
        m._gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            got = m.step(batch, "train")["cond_dropped"].item()
        assert low <= got <= high, (p, got)


def test_each_rank_draws_its_own_noise_and_timesteps():
    # seed_everything gives every rank the same global seed: the DiT's own generator must differ per rank,
    # or every rank trains on the same sigmas, noise and dropout
    from types import SimpleNamespace

    draws = []
    for rank in (0, 1, 1):
        torch.manual_seed(7)
        m = tiny_module()
        m._trainer = SimpleNamespace(global_rank=rank)
        draws.append(torch.rand(8, generator=m._rng()))
    assert not torch.equal(draws[0], draws[1]) and torch.equal(draws[1], draws[2])
