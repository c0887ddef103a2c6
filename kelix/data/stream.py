"""A resumable stream of samples from WebDataset shards.

Each consumer (one dataloader worker on one rank) reads its own share of every source:

* shards are split by node first, then by worker (``order[rank::world][worker::workers]``), so every
  shard goes to exactly one consumer whatever the two counts are; with fewer shards than consumers,
  every consumer reads every shard and keeps sample ``i`` where ``i % consumers == consumer``, with
  one consumer index ``rank * workers + worker`` (the official loader's two separate modulos drop
  samples when the counts share a factor);
* a shuffle buffer of *raw* samples (undecoded bytes) mixes each source; decoding happens after
  (lazily when a processor runs: it filters by the image header before any pixel is decoded);
* sources are mixed by weight; all randomness is a hash of (seed, consumer, counter), so the
  state is a handful of counters plus the buffer's sample locations (:meth:`ShardStream.state_dict`).
  Restoring re-reads only the shards still referenced by the buffer.

Bad samples (corrupt image, bad JSON, missing image, duplicate key, oversized member, image over the
pixel limit, unreadable or truncated shard...) are skipped, counted in ``stats`` and logged; the
stream goes on. A sample the processor drops is replaced by the next one *of the same source*, so
the mixture weights are the shares of the samples the model gets, not of the samples read.
"""

from __future__ import annotations

import hashlib
import logging
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from kelix.data.decode import DEFAULT_MAX_PIXELS, decode_fields
from kelix.data.schema import SampleError, parse_sample
from kelix.data.shards import DEFAULT_MAX_MEMBER_BYTES, Source, as_sources, read_manifests, read_shard

__all__ = ["ShardStream", "read_shard", "uniform"]

log = logging.getLogger("kelix.data")
STATE_VERSION = 1


def uniform(*key: int) -> float:
    """Deterministic uniform number in [0, 1) from integer keys (a counter-based RNG)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(key)}q", *key), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class _SourceCursor:
    """One consumer's position in one source: epoch, shard, offset, and its shuffle buffer."""

    def __init__(self, stream: ShardStream, index: int, source: Source):
        self.stream, self.index, self.urls = stream, index, source.urls
        self.epoch = self.shard_pos = self.offset = self.seen = self.pops = 0
        self.buffer: list[tuple[tuple[int, int, int], dict]] = []  # ((epoch, shard_pos, idx), raw)
        self.done = False
        self._reader: Iterator | None = None

    # -- which shards this consumer reads, and which of their samples it keeps
    def order(self, epoch: int) -> list[str]:
        s = self.stream
        urls = list(self.urls)
        if s.shuffle_shards:  # the same permutation on every consumer, new each epoch
            random.Random(int(uniform(s.seed, self.index, epoch, -2) * 2**53)).shuffle(urls)
        if s.split_mode(len(urls)) == "shard":
            return urls[s.rank :: s.world_size][s.worker :: s.num_workers]
        return urls

    def _keeps(self, global_index: int) -> bool:
        s = self.stream
        return s.split_mode(len(self.urls)) == "shard" or global_index % s.consumers == s.consumer

    def _next_raw(self):
        """Next raw sample of this consumer, moving across shards and epochs; None when done."""
        while True:
            shards = self.order(self.epoch)
            if self.shard_pos >= len(shards):
                if not self.stream.repeat or not shards:
                    return None
                self.epoch, self.shard_pos, self.offset, self._reader = self.epoch + 1, 0, 0, None
                continue
            if self._reader is None:
                self._reader = self.stream._guard_shard(shards[self.shard_pos], self.offset)
            item = next(self._reader, None)
            if item is None:
                self.shard_pos, self.offset, self._reader = self.shard_pos + 1, 0, None
                continue
            idx, raw = item
            self.offset, self.seen = idx + 1, self.seen + 1
            if self._keeps(self.seen - 1):
                return (self.epoch, self.shard_pos, idx), raw

    def next(self):
        """Next raw sample after the shuffle buffer; None when the source is exhausted."""
        size = max(1, self.stream.shuffle_buffer)
        while len(self.buffer) < size:
            item = self._next_raw()
            if item is None:
                break
            self.buffer.append(item)
        if not self.buffer:
            self.done = True
            return None
        j = int(uniform(self.stream.seed, self.stream.consumer, self.index, self.pops) * len(self.buffer))
        self.pops += 1
        # Swap-remove keeps pops O(1); the replacement is refilled on the next call.
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    def state(self) -> dict:
        return dict(epoch=self.epoch, shard_pos=self.shard_pos, offset=self.offset, seen=self.seen,
                    pops=self.pops, done=self.done, buffer=[list(loc) for loc, _ in self.buffer])

    def restore(self, st: dict):
        for k in ("epoch", "shard_pos", "offset", "seen", "pops", "done"):
            setattr(self, k, st[k])
        locs = [tuple(x) for x in st["buffer"]]
        wanted: dict[tuple[int, int], set[int]] = {}
        for e, p, i in locs:
            wanted.setdefault((e, p), set()).add(i)
        found = {}
        for (e, p), idxs in wanted.items():
            url = self.order(e)[p]
            for i, raw in self.stream._guard_shard(url, min(idxs)):
                if i in idxs:
                    found[(e, p, i)] = raw
                if len(found) == len(locs) or i >= max(idxs):
                    break
        self.buffer = [(loc, found[loc]) for loc in locs if loc in found]


class ShardStream(IterableDataset):
    """Stream processed samples from weighted WebDataset sources (see module docstring).

    Args:
        sources: the mixture (patterns, :class:`Source` objects or dicts).
        processor: ``Sample -> item`` run after decoding (``None`` yields :class:`Sample` objects);
            may return None or raise :class:`SampleError` to skip a sample.
        seed: seeds shard order, shuffle buffer and mixture draws.
        shuffle_buffer: raw samples held per source for shuffling (1 = no shuffling).
        shuffle_shards: permute the shard order every epoch.
        repeat: start a new epoch when a source runs out (training); False ends the stream
            when all sources are exhausted (evaluation).
        attach_stats: yield ``(item, stats)`` pairs so a collate function can report skip counts.
        max_image_pixels: images with more pixels are skipped from their header, never decoded
            (``too_many_pixels``; decompression bombs).
        max_member_bytes: a sample with a larger tar member is skipped without reading it
            (``oversized_member``).
    """

    def __init__(self, sources, processor: Callable | None = None, seed: int = 0, shuffle_buffer: int = 1000,
                 shuffle_shards: bool = True, repeat: bool = True, attach_stats: bool = False,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        self.sources = as_sources(sources)
        for s in self.sources:
            if not s.urls:
                s.expand()
        if max_image_pixels < 1 or max_member_bytes < 1:
            raise ValueError(f"max_image_pixels ({max_image_pixels}) and max_member_bytes ({max_member_bytes}) "
                             "must be >= 1")
        self.max_image_pixels, self.max_member_bytes = max_image_pixels, max_member_bytes
        # sample counts of kit-written shards (their manifests), checked when a shard is read to its end
        self.expected = read_manifests([u for s in self.sources for u in s.urls])
        self.processor, self.seed = processor, seed
        self.shuffle_buffer, self.shuffle_shards, self.repeat = shuffle_buffer, shuffle_shards, repeat
        self.attach_stats = attach_stats
        self.rank, self.world_size = 0, 1
        self.stats: Counter = Counter()
        self._pending_state: dict | None = None

    # -- topology
    def set_distributed(self, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.rank, self.world_size = rank, world_size

    @property
    def worker(self) -> int:
        info = get_worker_info()
        return info.id if info else 0

    @property
    def num_workers(self) -> int:
        info = get_worker_info()
        return info.num_workers if info else 1

    @property
    def consumers(self) -> int:
        return self.world_size * self.num_workers

    @property
    def consumer(self) -> int:
        return self.rank * self.num_workers + self.worker

    def split_mode(self, num_shards: int) -> str:
        return "shard" if num_shards >= self.consumers else "sample"

    # -- bad input
    def _skip(self, reason: str, message: str):
        self.stats[f"skipped/{reason}"] += 1
        n = self.stats[f"skipped/{reason}"]
        self._last_skip = message
        if n == 1:  # one line per reason on the terminal; the counts go to TensorBoard and the end-of-fit summary
            log.warning("skipped sample (%s): %s (further ones are counted as data/skipped/%s)", reason, message, reason)
        else:
            log.debug("skipped sample (%s, #%d): %s", reason, n, message)
        skipped = sum(v for k, v in self.stats.items() if k.startswith("skipped/"))
        if self.stats["samples"] == 0 and skipped >= 200:
            raise RuntimeError(f"the first {skipped} samples were all skipped; the last one: {message}")

    def _guard_shard(self, url: str, start: int) -> Iterator[tuple[int, dict]]:
        """read_shard, turning an unreadable or truncated shard into a counted skip."""
        try:
            yield from read_shard(url, start, self.max_member_bytes, self.expected.get(url))
        except SampleError as e:
            self._skip(e.reason, str(e))
        except Exception as e:  # noqa: BLE001
            self._skip("unreadable_shard", f"{url}: {type(e).__name__}: {e}")

    def _prepare(self, raw: dict):
        shard, key = raw.get("__url__", "?"), raw.get("__key__", "?")
        if "__error__" in raw:  # the shard reader's verdict (duplicate key, oversized member)
            reason, message = raw["__error__"]
            self._skip(reason, f"{shard}:{key}: {message}")
            return None
        try:
            # lazy with a processor: it filters by the header's size first and may decode a large JPEG
            # at a reduced scale; without one (validate, stats) every image is decoded and checked here
            fields = decode_fields(raw, shard, key, self.max_image_pixels, lazy=self.processor is not None)
            sample = parse_sample(fields, shard, key)
            item = self.processor(sample) if self.processor is not None else sample
            if item is None:
                raise SampleError("filtered", f"{shard}:{key}: dropped by the processor")
            return item
        except SampleError as e:
            self._skip(e.reason, str(e))
        except Exception as e:  # noqa: BLE001 - a processor bug on one sample must not end the run
            self._skip("processor_error", f"{shard}:{key}: {type(e).__name__}: {e}")
        return None

    def _next_kept(self, c: _SourceCursor):
        """The next sample of ``c``'s source that decodes and passes the processor; None when exhausted.

        A skipped sample is replaced from the same source (not by a new mixture draw), so a source
        whose processor drops half its samples still gets its weight's share of the batches.
        """
        label, rejected = self.sources[c.index].label, 0
        while (got := c.next()) is not None:
            item = self._prepare(got[1])
            if item is not None:
                return item
            rejected += 1
            if rejected >= 200 and self.stats[f"source/{label}"] == 0:
                raise RuntimeError(f"data source {label!r}: the first {rejected} samples read were all skipped; "
                                   f"the last one: {self._last_skip}")
        return None

    # -- iteration
    def __iter__(self):
        cursors = [_SourceCursor(self, i, s) for i, s in enumerate(self.sources)]
        step = 0
        if self._pending_state is not None:
            st, self._pending_state = self._pending_state, None
            step = st["step"]
            self.stats = Counter(st["stats"])
            for c, cs in zip(cursors, st["sources"]):
                c.restore(cs)
        self._cursors, self._step = cursors, step
        while True:
            live = [c for c in cursors if not c.done]
            if not live:
                return
            total = sum(self.sources[c.index].weight for c in live)
            u = uniform(self.seed, self.consumer, -1, self._step) * total
            self._step += 1
            for c in live:
                u -= self.sources[c.index].weight
                if u < 0:
                    break
            item = self._next_kept(c)
            if item is None:  # the source is exhausted
                continue
            self.stats["samples"] += 1
            self.stats[f"source/{self.sources[c.index].label}"] += 1
            yield (item, dict(self.stats, consumer=self.consumer)) if self.attach_stats else item

    # -- resumable state (torchdata's StatefulDataLoader calls these in each worker)
    def state_dict(self) -> dict:
        cursors = getattr(self, "_cursors", None)
        if cursors is None:
            return self._pending_state or {}
        return dict(version=STATE_VERSION, consumer=self.consumer, consumers=self.consumers, step=self._step,
                    stats=dict(self.stats), sources=[c.state() for c in cursors])

    def load_state_dict(self, state: dict):
        if not state:
            return
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data stream state version {state.get('version')} != {STATE_VERSION}")
        if state["consumers"] != self.consumers or state["consumer"] != self.consumer:
            raise ValueError(
                f"data stream state was saved by consumer {state['consumer']} of {state['consumers']} "
                f"(world size x workers) but is loaded by consumer {self.consumer} of {self.consumers}: "
                "resume with the same number of devices and workers, or set data.resume: restart"
            )
        if len(state["sources"]) != len(self.sources):
            raise ValueError(f"data stream state has {len(state['sources'])} sources, the recipe {len(self.sources)}")
        self._pending_state = state
