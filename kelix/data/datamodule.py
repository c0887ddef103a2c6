"""The LightningDataModule that streams WebDataset shards for every stage of the kit."""

from __future__ import annotations

import itertools
import logging
import signal
from collections import deque
from collections.abc import Callable
from typing import Literal

import lightning.pytorch as pl
from torchdata.stateful_dataloader import StatefulDataLoader

from kelix.data.decode import DEFAULT_MAX_PIXELS
from kelix.data.processor import CollateWithStats, Processor, as_padding
from kelix.data.shards import DEFAULT_MAX_MEMBER_BYTES, Source, as_sources
from kelix.data.stream import ShardStream, uniform
from kelix.data.synthetic import SyntheticData

log = logging.getLogger("kelix.data")
SourcesSpec = str | list[str] | list[Source] | None


def _ignore_sigterm(worker_id: int) -> None:
    # Preemption signals the whole process group: workers live on until the trainer has saved
    # its checkpoint (they exit with their parent), instead of dying under the next batch fetch.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ShardLoader(StatefulDataLoader):
    """A StatefulDataLoader whose saved position is that of the batches the model *consumed*.

    Lightning fetches a batch ahead of the training step, so the live loader state is one batch
    past the model; with ``track`` the loader keeps the state after each yielded batch and
    :meth:`state_dict` returns the one after the last batch reported by :meth:`note_consumed`
    (called by ShardDataModule's callback in ``on_train_batch_start``).
    ``restart`` ignores any saved state (``resume: restart``); ``pinned`` ignores the state
    Lightning loads (rank 0's copy) because this rank's own state was already applied.
    """

    restart: bool = False
    track: bool = False
    pinned: bool = False
    even_out: tuple[Callable, Callable] | None = None  # (any_left, first_batch) of _EvenBatches

    def __iter__(self):
        it = super().__iter__()
        if self.even_out is not None:
            return _EvenBatches(it, *self.even_out)
        if not self.track:
            return it
        self._consumed = self._yielded = 0
        self._history = deque([(0, it.state_dict())])
        return _TrackedIter(self, it)

    def note_consumed(self) -> None:
        self._consumed = getattr(self, "_consumed", 0) + 1
        hist = getattr(self, "_history", None)
        while hist and len(hist) > 1 and hist[0][0] < self._consumed:
            hist.popleft()

    def state_dict(self):
        for n, state in getattr(self, "_history", ()):
            if n == self._consumed:
                return state
        return super().state_dict()

    def load_state_dict(self, state_dict):
        if self.restart:
            log.warning("data.resume=restart: ignoring the saved stream position; the stream starts afresh")
            return
        if self.pinned:
            return
        super().load_state_dict(state_dict)


class _TrackedIter:
    def __init__(self, loader: ShardLoader, it):
        self.loader, self.it = loader, it

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        ld = self.loader
        ld._yielded += 1
        # No copy (a deepcopy costs ~0.1 s per batch with 8 workers x 1000-sample buffers): the
        # iterators build each state afresh (in-process: ShardStream.state_dict(); with workers:
        # a new snapshot per batch whose leaves are replaced, never mutated, by later updates).
        ld._history.append((ld._yielded, self.it.state_dict()))
        return batch

    def __getattr__(self, name):  # Lightning and torchdata look at the real iterator's attributes
        return getattr(self.it, name)


class _EvenBatches:
    """One rank's evaluation batches, padded so that every rank yields as many (the most any has).

    Under FSDP2 every forward is a collective, so a rank that stops while another still has batches
    leaves it waiting forever. Before each batch the ranks agree (one all-reduce of a flag) whether
    any still has one; a rank that has run out yields its last batch again, marked as padding
    (:func:`~kelix.data.processor.is_padding`), which the module runs and counts for nothing, so
    every metric is the one over the real batches. A rank with no batch at all pads with
    ``first_batch()`` (the first batch of the unsplit data).
    """

    def __init__(self, it, any_left: Callable[[bool], bool], first_batch: Callable[[], dict]):
        self.it, self.any_left, self.first_batch = it, any_left, first_batch
        self.last, self.exhausted = None, False

    def __iter__(self):
        return self

    def __next__(self):
        batch = None
        if not self.exhausted:
            try:
                batch = next(self.it)
            except StopIteration:
                self.exhausted = True
        if not self.any_left(batch is not None):
            raise StopIteration
        if batch is not None:
            self.last = batch
            return batch
        if self.last is None:
            self.last = self.first_batch()
        return as_padding(self.last)

    def __getattr__(self, name):
        return getattr(self.it, name)


class _ConsumedBatches(pl.Callback):
    """Tells the training loader each time the model takes a batch (see :class:`ShardLoader`)."""

    def __init__(self, datamodule: ShardDataModule):
        self.datamodule = datamodule

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        loader = self.datamodule._loaders.get("train")
        if loader is not None:
            loader.note_consumed()


_SPLITS = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}  # a stage's reads


class ShardDataModule(pl.LightningDataModule):
    """Stream samples from WebDataset shards through a processor.

    Args:
        train: training sources: a pattern, a list of patterns, or a list of
            ``{shards, weight, name}`` mixtures (see :class:`~kelix.data.shards.Source`).
        val: validation sources (read once per validation run, no repetition). On several ranks,
            a rank with fewer batches runs padding batches (repeats counted for nothing) until the
            others finish, so FSDP2's collectives never wait on a rank that stopped.
        test: test sources (evened out across ranks like ``val``).
        predict: prediction sources.
        processor: turns each sample into a model item and collates items (picked by ``class_path``).
        batch_size: samples per batch per device.
        val_batch_size: batch size for val/test/predict (defaults to ``batch_size``).
        num_workers: dataloader worker processes per device.
        shuffle_buffer: raw samples held per source for shuffling (1 disables).
        seed: seed of shard order, shuffling and mixture draws.
        synthetic: generate these synthetic shards in ``prepare_data`` if they are missing.
        resume: ``exact`` restores every rank's stream position saved in a checkpoint, so the run
            continues with exactly the samples the uninterrupted run would have seen (the number
            of processes and ``num_workers`` must be those of the saved run; otherwise resuming
            fails with a message saying so). ``restart`` ignores the saved position: the stream
            starts a new pass, shuffled with a seed derived from ``seed`` and the resumed step
            (samples seen before may be seen again; use it when the world size changed).
        prefetch_factor: batches prefetched per worker.
        pin_memory: pin host memory of batches (GPU training).
        max_image_pixels: an image with more pixels (width x height, read from its header) is
            skipped before it is decoded (``data/skipped/too_many_pixels``): a guard against
            decompression bombs, far above training resolutions (images are resized after decoding).
            PIL's own ``Image.MAX_IMAGE_PIXELS`` (89M) caps it.
        max_member_bytes: a sample with a larger file in its shard is skipped without reading
            that file (``data/skipped/oversized_member``).
    """

    def __init__(
        self,
        train: SourcesSpec = None,
        val: SourcesSpec = None,
        test: SourcesSpec = None,
        predict: SourcesSpec = None,
        processor: Processor | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        synthetic: SyntheticData | None = None,
        resume: Literal["exact", "restart"] = "exact",
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        # Parse sources now so a malformed spec fails before any model is built.
        self.specs = {k: as_sources(v) if v is not None else None
                      for k, v in dict(train=train, val=val, test=test, predict=predict).items()}
        self.processor = processor or Processor()
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.synthetic, self.resume = synthetic, resume
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        if max_image_pixels < 1 or max_member_bytes < 1:
            raise ValueError(f"data.max_image_pixels ({max_image_pixels}) and data.max_member_bytes "
                             f"({max_member_bytes}) must be >= 1")
        self.max_image_pixels, self.max_member_bytes = max_image_pixels, max_member_bytes
        self.streams: dict[str, ShardStream] = {}
        self._loaders: dict[str, ShardLoader] = {}
        self._train_state: dict | None = None  # this rank's saved loader state, applied to the next train loader
        self._restart_step: int | None = None

    def prepare_data(self):
        if self.synthetic is not None:
            self.synthetic.ensure()

    def _stream(self, split: str) -> ShardStream:
        if split not in self.streams:
            sources = self.specs.get(split)
            if sources is None:
                raise ValueError(f"data.{split} is not set in the recipe, but the {split} loop needs it")
            for s in sources:  # a pattern matching nothing fails here, at start
                s.expand()
            stream = ShardStream(
                sources, processor=self.processor, seed=self.seed, shuffle_buffer=self.shuffle_buffer if split == "train" else 1,
                shuffle_shards=split == "train", repeat=split == "train", attach_stats=True,
                max_image_pixels=self.max_image_pixels, max_member_bytes=self.max_member_bytes,
            )
            if self.trainer is not None:
                stream.set_distributed(self.trainer.global_rank, self.trainer.world_size)
            if split == "train" and self._restart_step is not None:
                stream.seed = self._restart_seed()
            n = sum(len(s.urls) for s in sources)
            log.info("data.%s: %d shard(s) in %d source(s)", split, n, len(sources))
            self.streams[split] = stream
        return self.streams[split]

    def check_inputs(self, stage: str | None = None) -> None:
        """Expand every shard pattern ``stage`` reads, so that a missing one is the user's one-line error
        before the run starts (``kelix fit``); synthetic shards are written by ``prepare_data`` first."""
        if self.synthetic is None:
            for split in _SPLITS.get(stage, ["train", "val", "test", "predict"]):
                for s in self.specs.get(split) or ():
                    s.expand()

    def setup(self, stage: str | None = None):
        for split in _SPLITS.get(stage, ["train", "val", "test", "predict"]):
            if self.specs.get(split) is not None:
                self._stream(split)
        trainer = self.trainer
        if trainer is not None and not any(isinstance(c, _ConsumedBatches) for c in trainer.callbacks):
            trainer.callbacks.append(_ConsumedBatches(self))

    def _loader(self, split: str) -> ShardLoader:
        stream = self._stream(split)
        bs = self.batch_size if split == "train" else self.val_batch_size
        kw = dict(prefetch_factor=self.prefetch_factor) if self.num_workers > 0 else {}
        if self.num_workers > 0:
            kw["worker_init_fn"] = _ignore_sigterm
        loader = ShardLoader(stream, batch_size=bs, num_workers=self.num_workers, pin_memory=self.pin_memory,
                             collate_fn=CollateWithStats(self.processor), **kw)
        loader.restart = self.resume == "restart"
        if split in ("val", "test") and self.trainer is not None and self.trainer.world_size > 1:
            loader.even_out = (self._any_rank_has_a_batch, lambda: self._first_batch(split))
        if split == "train":
            loader.track = True
            if self._train_state is not None:
                StatefulDataLoader.load_state_dict(loader, self._train_state)
                loader.pinned = True  # ignore rank 0's copy that Lightning loads next
                self._train_state = None
        self._loaders[split] = loader
        return loader

    # -- resume: every rank's position is gathered into the checkpoint (Lightning keeps only rank 0's)
    def state_dict(self) -> dict:
        """Called on every rank when a checkpoint is saved; rank 0's return value is what is stored."""
        from kelix.training.resume import gather_to_rank0

        loader = self._loaders.get("train")
        states = gather_to_rank0(loader.state_dict() if loader is not None else None)
        trainer = self.trainer
        return {"version": 1, "world_size": len(states) if states else 0, "num_workers": self.num_workers,
                "step": trainer.global_step if trainer is not None else 0, "train": states}

    def load_state_dict(self, state: dict) -> None:
        if not state or not state.get("train"):
            return
        if self.resume == "restart":
            self._restart_step = int(state.get("step", 0))
            if "train" in self.streams:
                self.streams["train"].seed = self._restart_seed()
            log.warning("data.resume=restart: the stream starts a new pass (seed from step %d)", self._restart_step)
            return
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        saved_world, saved_workers = state["world_size"], state["num_workers"]
        if saved_world != world or saved_workers != self.num_workers:
            raise ValueError(
                f"the checkpoint's data stream position was saved by {saved_world} process(es) x {saved_workers} "
                f"worker(s) but this run has {world} x {self.num_workers}: resume with the same trainer.num_nodes, "
                "trainer.devices and data.init_args.num_workers, or set data.init_args.resume: restart")
        self._train_state = state["train"][rank]

    # -- evaluation on several ranks: the same number of batches everywhere (see _EvenBatches)
    def _any_rank_has_a_batch(self, mine: bool) -> bool:
        import torch

        strategy = self.trainer.strategy
        flag = torch.tensor(float(mine), device=strategy.root_device)
        return bool(strategy.reduce(flag, reduce_op="max") > 0)

    def _first_batch(self, split: str):
        """The first batch of ``split`` read by one consumer of the whole data (a rank of its own has none)."""
        stream = ShardStream(self.specs[split], processor=self.processor, shuffle_buffer=1, shuffle_shards=False,
                             repeat=False, attach_stats=True, max_image_pixels=self.max_image_pixels,
                             max_member_bytes=self.max_member_bytes)
        items = list(itertools.islice(stream, self.val_batch_size))
        if not items:
            raise RuntimeError(f"data.{split}: another rank has a batch, but no sample of the whole set could be read")
        return CollateWithStats(self.processor)(items)

    def _restart_seed(self) -> int:
        return int(uniform(self.seed, self._restart_step or 0, -3) * 2**62)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val") if self.specs["val"] is not None else []

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("predict")
