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
