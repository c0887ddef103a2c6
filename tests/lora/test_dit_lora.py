"""LoRA on the DiT: only the adapters and the connector train (the EMA follows them), checkpoints hold those and
their EMA, and the merged export (at the end of fit, or ``kelix export-dit --merge-lora``) predicts what the
adapter model does."""

from __future__ import annotations

import pytest
import torch

from kelix.lora import LoRAConfig
from tests.dit.conftest import one_thread, tiny_dit, tiny_module  # noqa: F401
from tests.dit.test_module import fixed_batch

SANA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture
def base(tmp_path):
    tiny_dit(seed=3).save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def _trained(base, steps: int = 3):
    m = tiny_module(init_from=base, cond_dropout=0.0, ema_decay=0.5, ema_warmup=False,
                    lora=LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=SANA_TARGETS))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        m.step(fixed_batch(), "train")["loss"].backward()
        opt.step()
        opt.zero_grad()
        from kelix.dit.ema import ema_update_

        ema_update_(m.ema, m.dit, 0.5)
    return m


def test_only_the_adapters_and_the_connector_train_and_the_checkpoint_holds_them(base):
    m = tiny_module(init_from=base, lora=LoRAConfig(r=2, target_modules=SANA_TARGETS))
    names = {n for n, p in m.dit.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n or n.startswith(("connector.", "null_condition")) for n in names)
    assert any("attn1.to_q.lora_A" in n for n in names) and any("attn2.to_out.0.lora_B" in n for n in names)
    sd = m.state_dict()
    assert {f"dit.{n}" for n in names} | {f"ema.{n}" for n in names} <= set(sd)
    assert not any("base_layer" in k or "transformer.proj_out" in k for k in sd)
    with pytest.raises(ValueError, match=r"lora.target_modules \['q_proj', .*\] match no linear layer of SanaTransformer2DModel"):
        tiny_module(init_from=base, lora=LoRAConfig(r=2))


def test_merged_export_predicts_what_the_adapter_ema_does(base, tmp_path):
    from kelix.dit.export import main as export_main
    from kelix.dit.model import load_dit

    m = _trained(base)
    before = load_dit(base)
    m.export(str(tmp_path / "at_end"))
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert export_main(["--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "x")]) == 2
    assert export_main(["--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300.0, 700.0])
    states, mask = torch.randn(2, 5, 12, generator=g), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        want = m.ema.eval()(x, t, states, mask)
        for path in ("merged", "at_end"):
            got = load_dit(str(tmp_path / path)).eval()(x, t, states, mask)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert (before.eval()(x, t, states, mask) - want).abs().max() > 1e-3
