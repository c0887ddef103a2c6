"""The EMA is updated once per optimizer step, before that step's checkpoints: a run stopped at a periodic
save and resumed ends with the uninterrupted run's EMA, bit for bit (gradient accumulation on)."""

import pytest
import torch
import yaml

from kelix.dit.ema import decay_at
from tests.dit.conftest import COND_DIM, TINY_SANA, tiny_module


def recipe(synthetic_dir, max_steps: int, every: int, accumulate: int, export: str | None = None) -> dict:
    return {
        "model": {"class_path": "kelix.dit.module.DiTModule", "init_args": {
            "dit": {"cond_dim": COND_DIM, "transformer": TINY_SANA},
            "condition": {"class_path": "kelix.dit.conditions.PromptBytesConditions", "init_args": {"dim": COND_DIM}},
            "ema_decay": 0.7, "sample_every_n_steps": 0, "cond_dropout": 0.3,
            "export_dir": export, "optim": {"lr": 3e-3, "schedule": "constant"}}},
        "data": {"class_path": "kelix.data.datamodule.ShardDataModule", "init_args": {
            "train": [str(synthetic_dir / "caption-00000.tar"), str(synthetic_dir / "t2i-00000.tar")],
            "processor": {"class_path": "kelix.dit.data.DiTProcessor",
                          "init_args": {"target_size": 16, "condition": "prompt"}},
            "batch_size": 2, "num_workers": 0, "shuffle_buffer": 4}},
        "trainer": {"max_steps": max_steps, "accumulate_grad_batches": accumulate, "accelerator": "cpu",
                    "log_every_n_steps": 1, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "checkpoint": {"every_n_train_steps": every},
    }


def fit(run_dir, cfg: dict, *extra: str):
    from kelix.cli import main

    (run_dir / "ema.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", "ema.yaml", *extra])
    return torch.load(run_dir / "runs/ema/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_from_a_periodic_checkpoint_gives_the_uninterrupted_ema(tmp_path, monkeypatch, synthetic_dir,
                                                                       accumulate):
    from kelix.dit.model import load_dit

    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir(), run_dir.mkdir()
    monkeypatch.chdir(ref_dir)
    ref = fit(ref_dir, recipe(synthetic_dir, 4, every=4, accumulate=accumulate, export=str(ref_dir / "export")))
    # the step-4 checkpoint holds the EMA the run ended with (export_dir is written from it when fit ends)
    final = load_dit(str(ref_dir / "export")).state_dict()
    assert all(torch.equal(v, ref["state_dict"][f"ema.{k}"]) for k, v in final.items())
    monkeypatch.chdir(run_dir)
    stopped = fit(run_dir, recipe(synthetic_dir, 2, every=2, accumulate=accumulate))  # ends at the periodic save
    assert stopped["global_step"] == 2 and stopped["kelix_dit"]["ema_step"] == 2
    got = fit(run_dir, recipe(synthetic_dir, 4, every=2, accumulate=accumulate), "--ckpt_path", "last")
    assert got["global_step"] == ref["global_step"] == 4 and got["kelix_dit"]["ema_step"] == 4
    ema = [k for k in ref["state_dict"] if k.startswith("ema.")]
    assert len(ema) > 10
    for k in ema:
        assert torch.equal(got["state_dict"][k], ref["state_dict"][k]), k
    # the EMA trails the live weights (it is a real average, not a copy)
    assert not torch.equal(ref["state_dict"]["ema.connector.0.weight"], ref["state_dict"]["dit.connector.0.weight"])


def test_one_ema_update_per_optimizer_step_under_accumulation():
    """A hand EMA of the live weights seen after each optimizer step equals the module's EMA."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    prompts = ["a red circle", "two blue squares", "x", "a green triangle on gray"]
    batches = [{"latents": torch.randn(2, 4, 8, 8, generator=g), "prompts": prompts[i % 2 * 2:][:2], "batch_size": 2}
               for i in range(6)]
    m = tiny_module(ema_decay=0.8, cond_dropout=0.0)
    m.optim.schedule, m.optim.lr = "constant", 3e-3
    start = {k: v.clone() for k, v in m.dit.state_dict().items()}
    seen = []

    class AfterStep(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step > len(seen):
                seen.append({k: v.clone() for k, v in module.dit.state_dict().items()})

    trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[AfterStep()])
    trainer.fit(m, DataLoader(batches, batch_size=None))
    assert trainer.global_step == 3 and len(seen) == 3 and m._ema_step == 3
    want = start
    for n, live in enumerate(seen):
        d = decay_at(n, 0.8)
        want = {k: d * want[k] + (1 - d) * live[k] for k in want}
    for k, v in m.ema.state_dict().items():
        assert torch.allclose(v, want[k], atol=1e-6, rtol=1e-5), k
    assert not torch.allclose(m.ema.connector[0].weight, seen[-1]["connector.0.weight"])

