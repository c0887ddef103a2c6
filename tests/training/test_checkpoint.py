"""Atomic checkpoint files and directories, the fallback after an interrupted swap, SIGTERM saving."""

import os

import pytest
import torch
import yaml

from kelix.cli import main
from kelix.training.checkpoint import PREEMPTED_EXIT_CODE, find_last_checkpoint, move_into_place
from tests.training.conftest import shard_recipe


def sharded_dir(path, tag: str):
    os.makedirs(path)
    for name in (".metadata", "__0_0.distcp", "meta.pt"):
        with open(os.path.join(path, name), "w") as f:
            f.write(tag)


def test_a_file_is_replaced_atomically(tmp_path):
    final, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    final.write_text("old")
    tmp.write_text("new")
    move_into_place(str(tmp), str(final))
    assert final.read_text() == "new" and not tmp.exists()
    assert find_last_checkpoint(str(tmp_path)) == str(final)


def test_a_sharded_directory_is_swapped_and_the_old_one_removed(tmp_path):
    final, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    sharded_dir(final, "old")
    sharded_dir(tmp, "new")
    move_into_place(str(tmp), str(final))
    assert (final / "meta.pt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]


@pytest.fixture
def disk_events(monkeypatch):
    """``("fsync", path)`` and ``("replace", src, dst)`` in the order they happen."""
    events = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    return events


def test_a_checkpoint_file_reaches_the_disk_before_its_rename_and_the_rename_after(tmp_path, disk_events):
    final, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    torch.save({"w": torch.arange(3)}, tmp)
    move_into_place(str(tmp), str(final))
    assert disk_events == [("fsync", str(tmp)), ("replace", str(tmp), str(final)), ("fsync", str(tmp_path))]


def test_every_file_of_a_sharded_checkpoint_is_synced_before_the_swap(tmp_path, disk_events):
    final, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    sharded_dir(final, "old")
    sharded_dir(tmp, "new")
    move_into_place(str(tmp), str(final))
    first_replace = next(i for i, e in enumerate(disk_events) if e[0] == "replace")
    synced_before = {e[1] for e in disk_events[:first_replace]}
    assert synced_before == {str(tmp / n) for n in (".metadata", "__0_0.distcp", "meta.pt")} | {str(tmp)}
    assert disk_events[first_replace:] == [("replace", str(final), str(final) + ".old"),
                                           ("replace", str(tmp), str(final)), ("fsync", str(tmp_path))]


def test_resume_never_picks_a_half_written_checkpoint(tmp_path):
    # killed mid-write: only the .tmp is incomplete, last.ckpt is the previous complete one
    sharded_dir(tmp_path / "last.ckpt", "complete")
    os.makedirs(tmp_path / "last.ckpt.tmp")
    assert find_last_checkpoint(str(tmp_path)) == str(tmp_path / "last.ckpt")
    # killed between the two renames of a swap: only last.ckpt.old is complete
    os.rename(tmp_path / "last.ckpt", tmp_path / "last.ckpt.old")
    assert find_last_checkpoint(str(tmp_path)) == str(tmp_path / "last.ckpt.old")
    # a directory without Lightning's meta.pt was never finished
    other = tmp_path / "other"
    os.makedirs(other / "last.ckpt")
    assert find_last_checkpoint(str(other)) is None


def test_a_complete_last_wins_over_a_complete_old(tmp_path):
    # killed after the new last.ckpt was in place but before last.ckpt.old was removed: both are
    # complete, and resuming from .old would repeat a checkpoint interval
    for name, tag in (("last.ckpt.old", "older"), ("last.ckpt", "newer")):
        sharded_dir(tmp_path / "dirs" / name, tag)
        (tmp_path / "files").mkdir(exist_ok=True)
        torch.save({"tag": tag}, tmp_path / "files" / name)
    assert find_last_checkpoint(str(tmp_path / "dirs")) == str(tmp_path / "dirs" / "last.ckpt")
    assert find_last_checkpoint(str(tmp_path / "files")) == str(tmp_path / "files" / "last.ckpt")


def test_sigterm_saves_last_at_the_end_of_the_step_and_exits_143(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = shard_recipe(tmp_path, max_steps=20)
    cfg["trainer"]["callbacks"] = [{"class_path": "tests.training.conftest.SignalAt", "init_args": {"step": 2}}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", "r.yaml"])
    assert e.value.code == PREEMPTED_EXIT_CODE == 143
    ckpt = torch.load(tmp_path / "runs/r/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3  # the signal came during step 2; the step finished, then saved


def test_last_is_saved_at_the_final_step_between_periodic_saves(tmp_path, monkeypatch):
    # every 2 steps, 3 steps in all: a resume must start from step 3, not from the periodic save of step 2
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(shard_recipe(tmp_path, max_steps=3, every=2)))
    main(["fit", "--config", "r.yaml"])
    ckpt = torch.load(tmp_path / "runs/r/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
