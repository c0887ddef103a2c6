import itertools
import os
from collections import Counter

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from kelix.data.processor import Processor
from kelix.data.shards import Source
from kelix.data.stream import ShardStream
from kelix.data.synthetic import TASKS
from tests.conftest import jpeg_bytes, text_records, write_shard


class KeyOnly(Processor):
    def __call__(self, sample):
        return sample.key

    def collate(self, items):
        return items


def make_text_shards(root, name: str, n_shards: int, per_shard: int) -> list[str]:
    return [write_shard(root / f"{name}-{i:03d}.tar", text_records(f"{name}{i}x", per_shard)) for i in range(n_shards)]


def keys_for(shards, world, workers, **kw):
    """Every key each (rank, worker) reads in one pass, through a real DataLoader with workers."""
    out = []
    for rank in range(world):
        s = ShardStream([Source(shards)], processor=KeyOnly(), repeat=False, shuffle_buffer=4, **kw)
        s.set_distributed(rank, world)
        loader = StatefulDataLoader(s, batch_size=None, num_workers=workers)
        out.extend(loader)
    return out


@pytest.mark.parametrize("n_shards", [5, 12])
@pytest.mark.parametrize("world, workers", [(1, 1), (2, 2), (2, 3), (4, 2)])
def test_node_then_worker_split_reads_every_sample_once(tmp_path, n_shards, world, workers):
    shards = make_text_shards(tmp_path, "s", n_shards, 7)
    keys = keys_for(shards, world, workers)
    want = {f"s{i}x{j:05d}" for i in range(n_shards) for j in range(7)}
    assert Counter(keys) == Counter(want)  # none dropped, none duplicated


def test_mixture_weights_are_respected(tmp_path):
    a = make_text_shards(tmp_path, "a", 2, 50)
    b = make_text_shards(tmp_path, "b", 2, 50)
    s = ShardStream([Source(a, weight=3.0, name="a"), Source(b, weight=1.0, name="b")], processor=KeyOnly(),
                    shuffle_buffer=16, repeat=True, seed=3)
    it = iter(s)
    keys = [next(it) for _ in range(4000)]
    frac_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert abs(frac_a - 0.75) < 0.03
    assert s.stats["source/a"] + s.stats["source/b"] == 4000


class DropHalfOfA(KeyOnly):
    """Drops every odd sample of source ``a`` (a filter such as the aspect-ratio rule)."""

    def __call__(self, sample):
        return None if sample.key.startswith("a") and int(sample.key[-1]) % 2 else sample.key


def test_mixture_weights_are_shares_of_kept_samples_when_a_source_is_filtered(tmp_path):
    a = make_text_shards(tmp_path, "a", 2, 50)
    b = make_text_shards(tmp_path, "b", 2, 50)
    make = lambda: ShardStream([Source(a, weight=1.0, name="a"), Source(b, weight=1.0, name="b")],  # noqa: E731
                               processor=DropHalfOfA(), shuffle_buffer=16, repeat=True, seed=3)
    s = make()
    it = iter(s)
    keys = [next(it) for _ in range(4000)]
    frac_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert abs(frac_a - 0.5) < 0.03  # counting raw draws, a would get 1/3
    assert s.stats["skipped/filtered"] == pytest.approx(sum(k.startswith("a") for k in keys), rel=0.1)
    # still deterministic and resumable
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(1234)]
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    assert head + [next(it) for _ in range(4000 - 1234)] == keys


def test_a_source_whose_samples_are_all_dropped_fails_naming_it(tmp_path):
    a = make_text_shards(tmp_path, "a", 1, 300)
    b = make_text_shards(tmp_path, "b", 1, 300)

    class DropA(KeyOnly):
        def __call__(self, sample):
            return None if sample.key.startswith("a") else sample.key

    # b first (most draws): the whole stream has kept samples when a's first draw comes
    s = ShardStream([Source(a, weight=1, name="a"), Source(b, weight=50, name="b")], processor=DropA(),
                    shuffle_buffer=1, seed=1)
    with pytest.raises(RuntimeError, match="data source 'a': the first 200 samples read were all skipped.*dropped"):
        list(itertools.islice(s, 10_000))
    assert 0 < s.stats["source/b"] < 10_000


def test_shuffle_is_deterministic_by_seed_and_changes_order(tmp_path):
    shards = make_text_shards(tmp_path, "s", 3, 20)
    run = lambda seed: list(ShardStream([Source(shards)], processor=KeyOnly(), repeat=False, shuffle_buffer=10, seed=seed))  # noqa: E731
    assert run(1) == run(1)
    assert run(1) != run(2) and sorted(run(1)) == sorted(run(2))
    plain = list(ShardStream([Source(shards)], processor=KeyOnly(), repeat=False, shuffle_buffer=1, shuffle_shards=False))
    assert plain == [f"s{i}x{j:05d}" for i in range(3) for j in range(20)]


def test_shuffle_buffer_mixes_one_shard_and_yields_every_sample_once_per_epoch(tmp_path):
    """One shard of 100 samples, a buffer of 8: the order is not the file order (a buffer always drawing
    the same slot gives file order after a sample or two), and no sample is stranded in the buffer."""
    shard = make_text_shards(tmp_path, "o", 1, 100)
    keys = [f"o0x{i:05d}" for i in range(100)]
    index = {k: i for i, k in enumerate(keys)}
    once = list(ShardStream([Source(shard)], processor=KeyOnly(), repeat=False, shuffle_buffer=8, seed=5))
    assert sorted(once) == keys
    # file order would make all 99 neighbours consecutive; a buffer of 8 picks the next one ~1 time in 8
    consecutive = sum(index[b] == index[a] + 1 for a, b in zip(once, once[1:]))
    assert consecutive < 30, consecutive
    # with `repeat` (training), 1000 draws are 10 epochs: reads 0..1007 less the 8 still buffered, so every
    # sample comes out 9 to 11 times, and the buffer never holds a sample read two epochs ago (a buffer
    # drawing one slot keeps its first samples forever; a random one keeps one 100 draws with p ~ 1e-6;
    # between draws it holds 7: the popped slot is refilled on the next draw)
    endless = ShardStream([Source(shard)], processor=KeyOnly(), repeat=True, shuffle_buffer=8, seed=5)
    counts, it = Counter(), iter(endless)
    for _ in range(10):
        counts.update(itertools.islice(it, 100))
        st = endless.state_dict()["sources"][0]
        assert len(st["buffer"]) == 7 and min(e for e, _, _ in st["buffer"]) >= st["epoch"] - 1, st
    assert set(counts) == set(keys) and 9 <= min(counts.values()) and max(counts.values()) <= 11


def test_bad_samples_are_skipped_counted_and_the_rest_kept(tmp_path):
    good = {"segments": [{"type": "image", "image": "0.jpg"}, {"type": "text", "text": "ok"}]}
    records = [
        {"__key__": "good1", "json": good, "0.jpg": jpeg_bytes()},
        {"__key__": "corrupt", "json": good, "0.jpg": jpeg_bytes()[:40]},
        {"__key__": "badjson", "json": b"{not json", "0.jpg": jpeg_bytes()},
        {"__key__": "missing", "json": good},
        {"__key__": "schema", "json": {"messages": [{"role": "cat", "content": "x"}]}},
        {"__key__": "good2", "json": good, "0.jpg": jpeg_bytes()},
    ]
    shard = write_shard(tmp_path / "mixed.tar", records)
    garbage = tmp_path / "broken.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    s = ShardStream([Source([shard, str(garbage)])], processor=KeyOnly(), repeat=False, shuffle_buffer=1,
                    shuffle_shards=False)
    assert list(s) == ["good1", "good2"]
    skipped = {k: v for k, v in s.stats.items() if k.startswith("skipped/")}
    assert skipped == {"skipped/corrupt_image": 1, "skipped/bad_json": 1, "skipped/missing_image": 1,
                       "skipped/schema": 1, "skipped/unreadable_shard": 1}


class Boom:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payload_in_a_shard_is_never_executed(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    payload = pickle.dumps(Boom(str(marker)))
    records = [{"__key__": f"k{i}", "json": {"segments": [{"type": "text", "text": "hi"}]}, "pyd": payload,
                "pkl": payload, "pth": payload} for i in range(3)]
    shard = write_shard(tmp_path / "evil.tar", records)
    out = list(ShardStream([Source(shard)], repeat=False, shuffle_buffer=1))
    assert [s.key for s in out] == ["k0", "k1", "k2"]
    assert not marker.exists()
    assert all("pyd" not in s.meta for s in out)


def test_pattern_matching_no_file_fails_at_start(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pattern '.*/nothing-\*\.tar' matches no file"):
        ShardStream([Source(str(tmp_path / "nothing-*.tar"))])
    with pytest.raises(ValueError, match="lists no shards"):
        Source([])


def test_brace_and_glob_patterns_expand(tmp_path):
    make_text_shards(tmp_path, "p", 4, 2)
    assert len(Source(str(tmp_path / "p-{000..002}.tar")).expand()) == 3
    assert len(Source(str(tmp_path / "p-*.tar")).expand()) == 4


def test_all_samples_failing_stops_with_the_reason(tmp_path):
    records = [{"__key__": f"k{i}", "json": {"foo": 1}} for i in range(250)]
    shard = write_shard(tmp_path / "bad.tar", records)
    with pytest.raises(RuntimeError, match="all skipped.*neither 'messages' nor 'segments'"):
        list(ShardStream([Source(shard)], repeat=False, shuffle_buffer=1))


def test_resume_in_process_continues_exactly(tmp_path):
    shards = make_text_shards(tmp_path, "r", 3, 15)
    make = lambda: ShardStream([Source(shards[:2], weight=2), Source(shards[2:])], processor=KeyOnly(),  # noqa: E731
                               shuffle_buffer=8, repeat=True, seed=5)
    full = make()
    it = iter(full)
    reference = [next(it) for _ in range(100)]
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(37)]
    state = first.state_dict()
    second = make()
    second.load_state_dict(state)
    it = iter(second)
    tail = [next(it) for _ in range(63)]
    assert head + tail == reference


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_through_stateful_dataloader(tmp_path, workers):
    shards = make_text_shards(tmp_path, "w", 4, 12)
    make = lambda: StatefulDataLoader(  # noqa: E731
        ShardStream([Source(shards)], processor=KeyOnly(), shuffle_buffer=6, repeat=True, seed=7),
        batch_size=3, num_workers=workers, collate_fn=KeyOnly().collate)
    ref_loader = make()
    it = iter(ref_loader)
    reference = [next(it) for _ in range(30)]
    loader = make()
    it = iter(loader)
    head = [next(it) for _ in range(11)]
    state = loader.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    it = iter(resumed)
    tail = [next(it) for _ in range(19)]
    assert head + tail == reference


def test_state_from_another_topology_fails_clearly(tmp_path):
    shards = make_text_shards(tmp_path, "t", 4, 5)
    s = ShardStream([Source(shards)], processor=KeyOnly())
    next(iter(s))
    state = s.state_dict()
    other = ShardStream([Source(shards)], processor=KeyOnly())
    other.set_distributed(1, 2)
    with pytest.raises(ValueError, match="saved by consumer 0 of 1 .* loaded by consumer 1 of 2"):
        other.load_state_dict(state)


def test_synthetic_shards_all_parse(synthetic_dir):
    s = ShardStream([Source(str(synthetic_dir / "*.tar"))], repeat=False, shuffle_buffer=1)
    samples = list(s)
    assert len(samples) == len(TASKS) * 2 * 8 and not any(k.startswith("skipped/") for k in s.stats)
    # a dense sample is schema task ocr (dense rendered text): 16 of its own, 16 of the ocr task
    assert Counter(x.task for x in samples) == {**{t: 16 for t in TASKS if t != "dense"}, "ocr": 32}
    assert os.path.basename(samples[0].shard).endswith(".tar")


def test_img2dataset_shards_stream_as_captions_without_conversion(tmp_path):
    records = [{"__key__": f"{i:09d}", "jpg": jpeg_bytes(), "txt": f"caption {i}",
                "json": {"url": f"http://example.com/{i}.jpg", "width": 32, "height": 24}} for i in range(3)]
    shard = write_shard(tmp_path / "00000.tar", records)
    out = list(ShardStream([Source(shard)], repeat=False, shuffle_buffer=1))
    assert [(s.task, s.turns[0].parts[1].text, s.images[0].pixels.size) for s in out] == [
        ("caption", f"caption {i}", (32, 24)) for i in range(3)]


def test_shard_order_is_reshuffled_every_epoch_and_shared_by_every_consumer(tmp_path):
    """One consumer, 6 shards of 4 samples, no buffer: each epoch reads every shard once, in a new order."""
    shards = make_text_shards(tmp_path, "e", 6, 4)
    stream = ShardStream([Source(shards)], processor=KeyOnly(), repeat=True, shuffle_buffer=1, seed=2)
    got = list(itertools.islice(stream, 24 * 4))
    orders = [list(dict.fromkeys(k.split("x")[0] for k in got[e * 24:(e + 1) * 24])) for e in range(4)]
    assert all(sorted(o) == [f"e{i}" for i in range(6)] for o in orders)
    assert len({tuple(o) for o in orders}) > 1, orders  # the same order every epoch is no shuffle across epochs


def test_consumers_shuffle_independently(tmp_path):
    # 2 ranks, one shard each (20 samples): each rank's buffer draws from its own stream of numbers, so the
    # within-shard orders differ (the same draws on every consumer would correlate every rank's batches)
    shards = make_text_shards(tmp_path, "c", 2, 20)
    orders = []
    for rank in range(2):
        s = ShardStream([Source(shards)], processor=KeyOnly(), repeat=False, shuffle_buffer=6, shuffle_shards=False)
        s.set_distributed(rank, 2)
        keys = list(s)
        assert sorted(keys) == [f"c{rank}x{j:05d}" for j in range(20)]
        orders.append([k.split("x")[1] for k in keys])
    assert orders[0] != orders[1]
