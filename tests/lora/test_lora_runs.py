"""LoRA through the real command line: kill -9 mid-run then ``--ckpt_path last`` gives the uninterrupted run's
step losses exactly, and the checkpoint holds the adapters and the trainable rest only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import text_records, write_shard

STEPS, EVERY, KILL = 6, 2, 5
pytestmark = pytest.mark.slow  # three short fits, one of them a fresh process: about a minute on 2 cores


def _recipe(tmp_path, base_dir, log: str, kill: int | None = None) -> str:
    root = tmp_path / "shards"
    if not root.exists():
        os.makedirs(root)
        for i in range(2):
            write_shard(root / f"t-{i}.tar", text_records(f"t{i}_", 24))
    callbacks = [{"class_path": "tests.lora.callbacks.LossLog", "init_args": {"path": str(tmp_path / log)}}]
    if kill is not None:
        callbacks.append({"class_path": "tests.lora.callbacks.KillAt", "init_args": {"step": kill}})
    recipe = {
        "name": "run",
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": STEPS, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "callbacks": callbacks},
        "checkpoint": {"every_n_train_steps": EVERY},
        "model": {"class_path": "kelix.llm.module.UnifiedLLMModule", "init_args": {
            "init_from": base_dir, "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "train_visual_head": True},
            "optim": {"lr": 1e-2, "warmup_steps": 1, "schedule": "cosine"}}},
        "data": {"class_path": "kelix.data.datamodule.ShardDataModule", "init_args": {
            "train": str(root / "t-{0..1}.tar"), "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8,
            "processor": {"class_path": "kelix.llm.data.LLMProcessor",
                          "init_args": {"text_tokenizer": base_dir, "N": 4, "K": 32, "max_blocks": 48}}}},
    }
    path = tmp_path / f"{log}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _losses(path) -> dict[int, float]:
    out = {}
    for line in open(path):
        step, loss = line.split()
        out[int(step)] = float(loss)
    return out


def _fit(*args):
    from kelix.training.cli import run_lightning_cli

    run_lightning_cli(["fit", *args])


@pytest.fixture(scope="module")
def runs(base_dir, tmp_path_factory):
    """The uninterrupted run (in this process), then a run killed by SIGKILL at step KILL (a subprocess)
    resumed with --ckpt_path last (in this process again)."""
    ref_dir, cut_dir = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("cut")
    cwd = os.getcwd()
    try:
        os.chdir(ref_dir)
        _fit("--config", _recipe(ref_dir, base_dir, "ref"))
        cut = _recipe(cut_dir, base_dir, "cut", kill=KILL)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([cwd, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "kelix.cli", "fit", "--config", cut], cwd=cut_dir, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -9, proc.stderr[-3000:]
        os.chdir(cut_dir)
        _fit("--config", _recipe(cut_dir, base_dir, "resumed"), "--ckpt_path", "last")
    finally:
        os.chdir(cwd)
    return ref_dir, cut_dir


def test_kill_9_then_resume_gives_the_same_step_losses(runs):
    ref_dir, cut_dir = runs
    ref, cut, resumed = _losses(ref_dir / "ref"), _losses(cut_dir / "cut"), _losses(cut_dir / "resumed")
    assert sorted(ref) == list(range(1, STEPS + 1)) and sorted(cut) == list(range(1, KILL + 1))
    assert sorted(resumed) == list(range(KILL, STEPS + 1))  # resumed from step KILL - 1's checkpoint
    assert {s: cut[s] for s in range(1, KILL)} == {s: ref[s] for s in range(1, KILL)}
    assert resumed == {s: ref[s] for s in resumed}
    assert ref[STEPS] < ref[1]


def test_the_checkpoint_holds_the_adapters_not_the_base(runs, base_dir):
    ckpt = torch.load(runs[0] / "runs" / "run" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    sd = ckpt["state_dict"]
    assert any(".lora_A." in k for k in sd) and "lm.backbone.lm_head.weight" in sd
    assert not any("base_layer" in k or "embed_tokens" in k for k in sd)
    assert ckpt["kelix_llm"]["lora"]["base"] == base_dir
