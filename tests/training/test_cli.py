"""`kelix fit --ckpt_path last`: finds the run, resumes into it, and continues exactly (one process)."""

import os

import pytest
import torch
import yaml

from kelix.cli import main
from tests.distributed.launch import key_sequence
from tests.training.conftest import shard_recipe


def fit(tmp_path, cfg: dict, *extra: str):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", "r.yaml", *extra])


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict):
    assert a["global_step"] == b["global_step"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_last_continues_exactly_in_the_same_run(tmp_path, monkeypatch, workers):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    for d in (ref_dir, run_dir):
        os.makedirs(d)
    monkeypatch.chdir(ref_dir)
    fit(ref_dir, shard_recipe(ref_dir, max_steps=6, workers=workers))
    monkeypatch.chdir(run_dir)
    fit(run_dir, shard_recipe(run_dir, max_steps=3, workers=workers))
    os.makedirs(run_dir / "runs/r/version_7")  # a newer run without checkpoint is passed over
    fit(run_dir, shard_recipe(run_dir, max_steps=6, workers=workers), "--ckpt_path", "last")
    assert sorted(os.listdir(run_dir / "runs/r")) == ["version_0", "version_7"]
    assert len([f for f in os.listdir(run_dir / "runs/r/version_0") if f.startswith("events")]) == 2
    ref, got = (load(d / "runs/r/version_0/checkpoints/last.ckpt") for d in (ref_dir, run_dir))
    assert_same_training_state(got, ref)
    assert key_sequence(run_dir / "keys", world=1) == key_sequence(ref_dir / "keys", world=1)  # keys and RNG draws


def test_resume_last_without_a_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint found under runs/r/version_\*/checkpoints/last.ckpt"):
        fit(tmp_path, shard_recipe(tmp_path), "--ckpt_path", "last")
    with pytest.raises(FileNotFoundError, match="no last.ckpt in checkpoint.dirpath"):
        fit(tmp_path, shard_recipe(tmp_path), "--ckpt_path", "last", "--checkpoint.dirpath", str(tmp_path / "ck"))


def test_multi_node_recipe_parses(tmp_path, capsys):
    cfg = shard_recipe(tmp_path)
    cfg["trainer"].update(accelerator="gpu", num_nodes=4, devices=8, precision="bf16-mixed",
                          strategy={"class_path": "kelix.training.parallel.FSDP2Strategy",
                                    "init_args": {"save_distributed_checkpoint": True}})
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(tmp_path / "big.yaml"), "--print_config"])
    assert e.value.code in (0, None)
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["trainer"]["num_nodes"] == 4 and out["trainer"]["devices"] == 8
    assert out["trainer"]["strategy"]["class_path"] == "kelix.training.parallel.FSDP2Strategy"
    assert out["trainer"]["strategy"]["init_args"]["tensor_parallel_size"] == 1
    assert out["checkpoint"]["save_on_sigterm"] is True and out["checkpoint"]["save_last"] is True
