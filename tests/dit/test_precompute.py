"""`kelix precompute-dit`: shards -> latent.npy + cond.npy shards that train through the precomputed path."""

import torch

from kelix.cli import main
from kelix.data.stream import ShardStream
from kelix.dit.conditions import PromptBytesConditions
from kelix.dit.data import DiTProcessor
from kelix.dit.vae import VAEConfig, load_vae
from tests.dit.conftest import COND_DIM


def test_precomputed_shards_hold_the_vae_latents_and_conditions(synthetic_dir, tmp_path, capsys):
    src = [str(synthetic_dir / "caption-00000.tar"), str(synthetic_dir / "vqa-00000.tar")]
    assert main(["precompute-dit", "--shards", *src, "--out", str(tmp_path / "pre"), "--tiny-vae-seed", "0",
                 "--smoke-prompt-dim", str(COND_DIM), "--target-size", "16", "--batch-size", "3",
                 "--samples-per-shard", "5", "--device", "cpu"]) == 0
    assert "samples=8 shards=2 skipped/not_t2i=8" in capsys.readouterr().out  # the VQA shard is not DiT data
    shards = sorted(p.name for p in (tmp_path / "pre").iterdir() if p.suffix == ".tar")  # (+ a manifest)
    assert shards == ["dit-000-00000.tar", "dit-000-00001.tar"]

    pre = list(ShardStream(str(tmp_path / "pre" / "*.tar"), shuffle_buffer=1, shuffle_shards=False, repeat=False,
                           processor=DiTProcessor(target="latents", condition="precomputed")))
    raw = list(ShardStream(src[0], shuffle_buffer=1, shuffle_shards=False, repeat=False,
                           processor=DiTProcessor(target_size=16, condition="prompt")))
    assert [i["key"] for i in pre] == [i["key"] for i in raw] and len(pre) == 8
    vae, cond = load_vae(VAEConfig(seed=0)), PromptBytesConditions(COND_DIM, max_length=720)
    for a, b in zip(pre, raw):
        assert a["prompt"] == b["prompt"] and a["cond"].dtype == torch.float16
        latent = vae.encode(b["pixels"][None])[0]
        torch.testing.assert_close(a["latents"], latent, atol=2e-3, rtol=2e-3)  # stored as float16
        states, mask = cond({"prompts": [b["prompt"]]})
        torch.testing.assert_close(a["cond"].float(), states[0][mask[0]], atol=2e-3, rtol=2e-3)
