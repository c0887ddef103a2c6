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


def test_resume_last_continues_exactly_in_the_same_run(tmp_path, monkeypatch, workers=0):
    """One process, the loader in the main process (tests/distributed covers ranks and workers)."""
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


def test_resume_last_without_a_checkpoint_is_a_clear_error(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:  # a user's input error: one line, exit 2 (kelix.console.errors)
        fit(tmp_path, shard_recipe(tmp_path), "--ckpt_path", "last")
    assert e.value.code == 2
    assert "no checkpoint found under runs/r/version_*/checkpoints/last.ckpt" in capfd.readouterr().err
    with pytest.raises(SystemExit):
        fit(tmp_path, shard_recipe(tmp_path), "--ckpt_path", "last", "--checkpoint.dirpath", str(tmp_path / "ck"))
    assert "no last.ckpt in checkpoint.dirpath" in capfd.readouterr().err


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


LAUNCH_ENVS = {
    # srun --nodes 4 --ntasks-per-node 8: task 19 is node 2, local rank 3
    "slurm": ({"SLURM_NTASKS": "32", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "4", "SLURM_NODEID": "2",
               "SLURM_PROCID": "19", "SLURM_LOCALID": "3", "SLURM_JOB_NAME": "kelix", "SLURM_JOB_ID": "1",
               "SLURM_NODELIST": "node[1-4]"}, "SLURMEnvironment"),
    # torchrun --nnodes 4 --nproc_per_node 8, on the third node
    "torchrun": ({"RANK": "19", "LOCAL_RANK": "3", "GROUP_RANK": "2", "WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "8",
                  "MASTER_ADDR": "node1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}, "TorchElasticEnvironment"),
}


@pytest.mark.parametrize("launcher", sorted(LAUNCH_ENVS))
def test_multi_node_launch_sees_its_place_in_the_world(tmp_path, monkeypatch, launcher):
    """What Lightning makes of a 4 x 8 launch: no process is started, nothing connects."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    from kelix.training.cli import run_lightning_cli

    env, cluster = LAUNCH_ENVS[launcher]
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # the trainer sets it to 19: restored after
    for k in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    cfg = shard_recipe(tmp_path)
    cfg["trainer"].update(accelerator="cpu", num_nodes=4, devices=8, strategy="fsdp2")
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(cfg))
    trainer = run_lightning_cli(["--config", str(tmp_path / "big.yaml")], run=False).trainer
    assert type(trainer.strategy.cluster_environment).__name__ == cluster
    assert type(trainer.strategy).__name__ == "FSDP2Strategy" and trainer.strategy.launcher is None
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (4, 8, 32)
    assert (trainer.node_rank, trainer.local_rank, trainer.global_rank) == (2, 3, 19)


def test_resume_from_an_explicit_checkpoint_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit(tmp_path, shard_recipe(tmp_path, max_steps=2))
    ckpt = str(tmp_path / "runs/r/version_0/checkpoints/last.ckpt")
    fit(tmp_path, shard_recipe(tmp_path, max_steps=3), "--ckpt_path", ckpt)
    assert load(tmp_path / "runs/r/version_1/checkpoints/last.ckpt")["global_step"] == 3  # a new run from it


def test_fit_from_the_command_line_does_not_warn_about_args(tmp_path, monkeypatch):
    """`kelix fit ...` passes its own command line on as ``args``: LightningCLI must not see it twice."""
    import sys
    import warnings

    monkeypatch.chdir(tmp_path)
    argv = ["kelix", "fit", "--config", "r.yaml"]
    monkeypatch.setattr(sys, "argv", list(argv))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, shard_recipe(tmp_path, max_steps=1))
    assert not [w for w in caught if "args parameter" in str(w.message)]
    assert sys.argv == argv  # restored after parsing (DDP's launcher re-runs it for each rank)
