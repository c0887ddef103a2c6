"""ShardDataModule through `kelix fit`: synthetic shards made in prepare_data, bad samples counted in TensorBoard;
evaluation streams in file order; each rank resumes its own stream position."""

import itertools

import numpy as np
import pytest
import torch
import yaml

from kelix.cli import main
from kelix.data.datamodule import ShardDataModule
from kelix.data.processor import Processor
from tests.conftest import jpeg_bytes, write_shard


class ColorFeatures(Processor):
    """x = mean RGB of the first image + a bias feature; y = mean of the red channel."""

    def __call__(self, sample):
        if not sample.images:
            return None
        rgb = np.asarray(sample.images[0].pixels, dtype=np.float32).mean((0, 1)) / 255.0
        return {"x": torch.tensor([*rgb, 1.0]), "y": torch.tensor(float(rgb[0]))}


def test_fit_on_synthetic_shards_counts_bad_samples_in_tensorboard(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = {"segments": [{"type": "image", "image": "0.jpg"}, {"type": "text", "text": "x"}]}
    # a source with some good samples among the bad (one that yields nothing at all stops the run)
    bad = write_shard(tmp_path / "bad.tar", [
        {"__key__": f"c{i}", "json": good, "0.jpg": jpeg_bytes()[:50]} for i in range(3)] + [
        {"__key__": "j", "json": b"{oops"}] + [{"__key__": f"g{i}", "json": good, "0.jpg": jpeg_bytes()} for i in range(2)])
    cfg = {
        "model": {"class_path": "tests.test_cli.TinyRegressor",
                  "init_args": {"optim": {"lr": 0.05, "schedule": "constant"}}},
        "data": {"class_path": "kelix.data.datamodule.ShardDataModule", "init_args": {
            "train": [{"shards": "syn/caption-*.tar", "weight": 1.0}, {"shards": [bad], "weight": 1.0, "name": "bad"}],
            "processor": {"class_path": f"{__name__}.ColorFeatures"},
            "synthetic": {"out_dir": "syn", "tasks": ["caption"], "shards_per_task": 2, "samples_per_shard": 16},
            "batch_size": 4, "num_workers": 2, "shuffle_buffer": 8}},
        "trainer": {"max_steps": 12, "accelerator": "cpu", "log_every_n_steps": 2, "enable_model_summary": False},
    }
    (tmp_path / "shards.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", "shards.yaml"])
    assert sorted(p.name for p in (tmp_path / "syn").iterdir()) == ["caption-00000.tar", "caption-00001.tar"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(tmp_path / "runs" / "shards" / "version_0")).Reload()
    last = lambda tag: ev.Scalars(tag)[-1].value  # noqa: E731
    assert last("data/skipped/corrupt_image") >= 1
    assert last("data/skipped/bad_json") >= 1
    assert last("data/samples") >= 12 * 4 - 2 * 4  # batches still in the prefetch queue are not counted yet


def test_missing_shards_fail_at_setup_with_the_pattern(tmp_path):
    dm = ShardDataModule(train=str(tmp_path / "none-{000..003}.tar"))
    with pytest.raises(FileNotFoundError, match=r"none-\{000..003\}.tar' matches no file"):
        dm.setup("fit")


def test_bad_arguments_fail_before_any_work():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ShardDataModule(train="x.tar", batch_size=0)
    with pytest.raises(ValueError, match="weight must be > 0"):
        ShardDataModule(train=[{"shards": "x.tar", "weight": 0}])
    with pytest.raises(ValueError, match=r"data.val is not set"):
        ShardDataModule(train="x.tar")._stream("val")


def lockstep(other_batches: int):
    """``any_left`` of a rank whose peer holds ``other_batches`` batches (the all-reduced max, in order)."""
    calls = iter(range(10**6))
    return lambda mine: (next(calls) < other_batches) or mine


class Keys(Processor):
    def __call__(self, sample):
        return sample.key

    def collate(self, items):
        return {"keys": items}


def test_a_rank_out_of_evaluation_batches_pads_until_its_peers_finish(tmp_path):
    from kelix.data.datamodule import _EvenBatches
    from kelix.data.processor import is_padding
    from tests.conftest import text_records

    mine = [{"keys": ["a", "b"]}, {"keys": ["c"]}]
    got = list(_EvenBatches(iter(mine), lockstep(4), first_batch=lambda: pytest.fail("not needed")))
    assert got[:2] == mine and [is_padding(b) for b in got] == [False, False, True, True]
    assert all(b["keys"] == ["c"] for b in got[2:])  # its last batch again, marked
    assert list(_EvenBatches(iter(mine), lockstep(1), first_batch=None)) == mine  # the longest rank: as it was

    # a rank with no batch of its own pads with the first batch of the whole set
    shard = write_shard(tmp_path / "v.tar", text_records("v", 5))
    dm = ShardDataModule(val=shard, processor=Keys(), val_batch_size=2)
    got = list(_EvenBatches(iter([]), lockstep(3), first_batch=lambda: dm._first_batch("val")))
    assert [(b["keys"], is_padding(b)) for b in got] == [(["v00000", "v00001"], True)] * 3
    with pytest.raises(TypeError, match="collate must return a dict"):
        list(_EvenBatches(iter([["x"]]), lockstep(2), first_batch=None))


def test_evaluation_streams_read_every_sample_once_in_file_order(tmp_path):
    # validation is comparable across runs only if it reads the same samples in the same order:
    # no shuffle buffer, no shard shuffling, no repetition, whatever the training stream does
    from tests.conftest import text_records

    shards = [write_shard(tmp_path / f"v{i}.tar", text_records(f"v{i}_", 6)) for i in range(3)]
    one = {"shards": shards}  # one source of 3 shards
    dm = ShardDataModule(train=one, val=one, test=one, processor=Keys(), shuffle_buffer=8, seed=4)
    want = [f"v{i}_{j:05d}" for i in range(3) for j in range(6)]
    for split in ("val", "test"):
        assert [item for item, _ in dm._stream(split)] == want
    assert [item for item, _ in itertools.islice(dm._stream("train"), 18)] != want  # while training is shuffled


def test_restart_reshuffles_with_a_seed_of_the_resumed_step():
    # resume: restart must not replay the first pass's order, and two restarts at different steps differ
    seeds = []
    for step in (4, 8):
        dm = ShardDataModule(train="x.tar", seed=3, resume="restart")
        dm.load_state_dict({"version": 1, "world_size": 2, "num_workers": 1, "step": step, "train": [{"a": 0}, {"a": 1}]})
        seeds.append(dm._restart_seed())
    assert len({3, *seeds}) == 3


def test_each_rank_resumes_its_own_stream_position():
    from types import SimpleNamespace

    dm = ShardDataModule(train="x.tar", num_workers=1)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    dm.load_state_dict({"version": 1, "world_size": 2, "num_workers": 1, "step": 4, "train": [{"rank": 0}, {"rank": 1}]})
    assert dm._train_state == {"rank": 1}
