"""DataHealth sums every worker's and every rank's counters, whatever keys each rank has seen."""

from types import SimpleNamespace

import torch

from kelix.training.callbacks import DataHealth


class Recorder:
    def __init__(self):
        self.logged = {}

    def log(self, name, value, sync_dist=False, **kw):
        assert not sync_dist  # a per-key all-reduce pairs up different keys on different ranks
        self.logged[name] = value


def test_counts_are_summed_over_workers_and_ranks_with_keys_one_rank_lacks(monkeypatch):
    other_rank = {"samples": 7, "skipped/duplicate_key": 2, "source/b": 7}  # keys in another order, one unseen here
    gathered_calls = []

    def all_gather_object(out, obj):
        gathered_calls.append(dict(obj))
        out[0], out[1] = obj, other_rank

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    cb, module = DataHealth(), Recorder()
    trainer = SimpleNamespace(global_step=4, log_every_n_steps=2)
    worker0 = {"consumer": 0, "samples": 3, "source/a": 3, "skipped/too_many_pixels": 1}
    worker1 = {"consumer": 1, "samples": 5, "source/a": 5}
    cb.on_train_batch_start(trainer, module, {"data_stats": worker0}, 0)
    cb.on_train_batch_start(trainer, module, {"data_stats": worker1}, 1)
    assert len(gathered_calls) == 2  # one gather per logging call, not one collective per key
    assert module.logged == {"data/samples": 15.0, "data/source/a": 8.0, "data/source/b": 7.0,
                             "data/skipped/too_many_pixels": 1.0, "data/skipped/duplicate_key": 2.0,
                             "data/skipped/corrupt_image": 0.0, "data/skipped/bad_json": 0.0,
                             "data/skipped/missing_image": 0.0, "data/skipped/unreadable_shard": 0.0}


def test_fit_ends_with_one_summary_line_of_samples_and_skips(monkeypatch):
    lines = []
    monkeypatch.setattr("kelix.training.callbacks.rank_zero_info", lines.append)
    cb, module = DataHealth(), Recorder()
    trainer = SimpleNamespace(global_step=1, log_every_n_steps=2)
    cb.on_train_batch_start(trainer, module, {"data_stats": {"consumer": 0, "samples": 4, "skipped/aspect_ratio": 3}}, 0)
    cb.on_train_batch_start(trainer, module, {"data_stats": {"consumer": 1, "samples": 6, "skipped/bad_json": 1}}, 1)
    cb.on_train_end(trainer, module)
    assert lines == ["data: 10 training samples read; skipped: aspect_ratio 3, bad_json 1"]


def test_a_skip_reason_reaches_the_terminal_once(tmp_path, caplog):
    import logging

    from kelix.data.stream import ShardStream
    from tests.conftest import write_shard

    bad = [{"__key__": f"k{i}", "json": b"{not json"} for i in range(5)]
    good = [{"__key__": "ok", "json": {"task": "text", "segments": [{"type": "text", "text": "hi"}]}}]
    path = write_shard(tmp_path / "s.tar", bad + good)
    with caplog.at_level(logging.WARNING, logger="kelix.data.stream"):
        samples = list(ShardStream([path], shuffle_buffer=1, repeat=False))
    assert [s.key for s in samples] == ["ok"]
    warned = [r for r in caplog.records if "skipped sample" in r.getMessage()]
    assert len(warned) == 1 and "bad_json" in warned[0].getMessage()
