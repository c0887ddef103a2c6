"""Exact resume under FSDP2 on 2 gloo CPU ranks: stop/resume, kill -9, SIGTERM, world-size change.

Every resumed run must end with the same parameters and optimizer state as the uninterrupted
reference run, and must have trained on the same sequence of sample keys per rank, none twice.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from kelix.training.convert import read_sharded
from tests.distributed import launch
from tests.distributed.conftest import ACCUMULATE, EVERY, NAN_STEP, STEPS, recipe, write_recipe

pytestmark = pytest.mark.distributed


def assert_same_checkpoint(a: str, b: str):
    ta, tb = read_sharded(a, ""), read_sharded(b, "")  # weights and optimizer state (exp_avg, exp_avg_sq, step)
    assert ta.keys() == tb.keys()
    assert any(k.startswith("optimizer_0.state.") for k in ta)
    diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not diff, f"{len(diff)} tensor(s) differ, e.g. {diff[:3]}"


def assert_same_keys(run_keys, ref_keys):
    got, want = launch.key_sequence(run_keys), launch.key_sequence(ref_keys)
    assert got == want
    flat = [k for rank in want.values() for _, keys, _ in rank for k in keys]
    assert len(flat) == STEPS * ACCUMULATE * 2 * 2 and len(set(flat)) == len(flat)  # one pass: no sample twice


def meta(ckpt: str) -> dict:
    return torch.load(os.path.join(ckpt, "meta.pt"), weights_only=True)


def test_reference_run_is_sharded_and_skips_the_nan_step_on_every_rank(reference):
    ckpt = reference["ckpt"]
    assert sorted(f for f in os.listdir(ckpt) if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    m = meta(ckpt)
    assert m["global_step"] == STEPS
    assert m["kelix"]["skipped_steps"] == 1  # rank 1's NaN skipped the step on both ranks
    assert len(m["kelix"]["rng"]) == 2 and len(m["ShardDataModule"]["train"]) == 2  # every rank's state is saved
    steps = read_sharded(ckpt, "optimizer_0.state.")
    assert {float(v) for k, v in steps.items() if k.endswith(".step")} == {STEPS - 1.0}  # AdamW skipped one update
    assert not os.path.exists(ckpt + ".tmp") and not os.path.exists(ckpt + ".old")
    # the global RNG draws the same on both ranks, the per-rank generators differ: a resume that gives
    # every rank rank 0's states would change rank 1's draws, which assert_same_keys compares
    seq = launch.key_sequence(reference["keys"])
    assert [n[0] for _, _, n in seq[0]] == [n[0] for _, _, n in seq[1]]
    assert all(a[2][1] != b[2][1] for a, b in zip(seq[0], seq[1]))
    assert len(m["kelix"]["rng"][1]["generators"]) == 1


def test_stop_then_resume_equals_the_uninterrupted_run(reference, shards, tmp_path):
    keys = tmp_path / "keys"
    first = write_recipe(tmp_path, recipe(shards, keys, max_steps=STEPS // 2 + 1))  # not on a checkpoint step
    assert launch.run(["--config", first], tmp_path) == [0, 0], launch.logs(tmp_path)
    last = tmp_path / "runs" / "toy" / "version_0" / "checkpoints" / "last.ckpt"
    assert meta(str(last))["global_step"] == STEPS // 2 + 1  # saved at the end, not only every EVERY steps
    full = write_recipe(tmp_path, recipe(shards, keys))
    assert launch.run(["--config", full, "--ckpt_path", "last"], tmp_path) == [0, 0], launch.logs(tmp_path)
    assert not (tmp_path / "runs" / "toy" / "version_1").exists()  # resumed into the same run directory
    assert_same_checkpoint(str(last), reference["ckpt"])
    assert_same_keys(keys, reference["keys"])


def test_kill_9_at_a_random_step_then_resume_equals_the_uninterrupted_run(reference, shards, tmp_path):
    keys = tmp_path / "keys"
    path = write_recipe(tmp_path, recipe(shards, keys))
    kill_at = random.Random().randint(EVERY * ACCUMULATE + 1, (STEPS - 1) * ACCUMULATE)  # a micro-batch index
    procs = launch.launch(["--config", path], tmp_path)
    deadline = time.monotonic() + 300
    while launch.batches_seen(keys) < kill_at and time.monotonic() < deadline and all(p.is_alive() for p in procs):
        time.sleep(0.02)
    for p in procs:  # the whole "node" dies at once, mid-step or mid-checkpoint
        p.kill()
        p.join()
    assert launch.batches_seen(keys) < STEPS * ACCUMULATE, "the run finished before it was killed"
    last = tmp_path / "runs" / "toy" / "version_0" / "checkpoints" / "last.ckpt"
    assert meta(str(last))["global_step"] % EVERY == 0
    assert launch.run(["--config", path, "--ckpt_path", "last"], tmp_path) == [0, 0], launch.logs(tmp_path)
    assert_same_checkpoint(str(last), reference["ckpt"])
    assert_same_keys(keys, reference["keys"])


def test_sigterm_to_kelix_fit_saves_exits_143_and_resumes_exactly(reference, shards, tmp_path):
    """The real command line: `kelix fit` with devices 2 (Lightning starts rank 1); SIGTERM to rank 0 only."""
    keys = tmp_path / "keys"
    path = write_recipe(tmp_path, recipe(shards, keys, **{"checkpoint.every_n_train_steps": 1000}))
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "kelix.cli", "fit", "--config", path]
    with open(tmp_path / "out.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while launch.batches_seen(keys) < NAN_STEP * ACCUMULATE and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=300)
    log = (tmp_path / "out.log").read_text()
    assert code == 143, log[-3000:]
    last = tmp_path / "runs" / "toy" / "version_0" / "checkpoints" / "last.ckpt"
    step = meta(str(last))["global_step"]
    assert NAN_STEP <= step < STEPS and f"preempted (SIGTERM) at step {step}" in log
    assert launch.run(["--config", path, "--ckpt_path", "last"], tmp_path) == [0, 0], launch.logs(tmp_path)
    assert_same_checkpoint(str(last), reference["ckpt"])
    assert_same_keys(keys, reference["keys"])


def test_world_size_change_fails_clearly_or_restarts_the_stream(reference, shards, tmp_path):
    import shutil

    shutil.copytree(reference["dir"] / "runs", tmp_path / "runs")
    one = write_recipe(tmp_path, recipe(shards, tmp_path / "keys", max_steps=STEPS + 2, **{"trainer.devices": 1}))
    assert launch.run(["--config", one, "--ckpt_path", "last"], tmp_path, world=1) == [1]
    log = launch.logs(tmp_path)
    assert "saved by 2 process(es) x 1 worker(s) but this run has 1 x 1" in log
    assert "data.init_args.resume: restart" in log
    restart = write_recipe(tmp_path, recipe(shards, tmp_path / "keys", max_steps=STEPS + 2,
                                            **{"trainer.devices": 1, "data.init_args.resume": "restart"}))
    assert launch.run(["--config", restart, "--ckpt_path", "last"], tmp_path, world=1) == [0], launch.logs(tmp_path)
    last = str(tmp_path / "runs" / "toy" / "version_0" / "checkpoints" / "last.ckpt")
    assert meta(last)["global_step"] == STEPS + 2  # weights and optimizer re-sharded from 2 ranks to 1
