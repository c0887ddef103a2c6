"""The LightningDataModule that streams WebDataset shards for every stage of the kit."""

from __future__ import annotations

import logging
from typing import Literal

import lightning.pytorch as pl
from torchdata.stateful_dataloader import StatefulDataLoader

from kelix.data.processor import CollateWithStats, Processor
from kelix.data.shards import Source, as_sources
from kelix.data.stream import ShardStream
from kelix.data.synthetic import SyntheticData

log = logging.getLogger("kelix.data")
SourcesSpec = str | list[str] | list[Source] | None


class ShardLoader(StatefulDataLoader):
    """A StatefulDataLoader whose saved stream position can be ignored (``resume: restart``)."""

    restart: bool = False

    def load_state_dict(self, state_dict):
        if self.restart:
            log.warning("data.resume=restart: ignoring the saved stream position; the stream starts afresh")
            return
        super().load_state_dict(state_dict)


class ShardDataModule(pl.LightningDataModule):
    """Stream samples from WebDataset shards through a processor.

    Args:
        train: training sources: a pattern, a list of patterns, or a list of
            ``{shards, weight, name}`` mixtures (see :class:`~kelix.data.shards.Source`).
        val: validation sources (read once per validation run, no repetition).
        test: test sources.
        predict: prediction sources.
        processor: turns each sample into a model item and collates items (picked by ``class_path``).
        batch_size: samples per batch per device.
        val_batch_size: batch size for val/test/predict (defaults to ``batch_size``).
        num_workers: dataloader worker processes per device.
        shuffle_buffer: raw samples held per source for shuffling (1 disables).
        seed: seed of shard order, shuffling and mixture draws.
        synthetic: generate these synthetic shards in ``prepare_data`` if they are missing.
        resume: ``exact`` restores the stream position saved in a checkpoint; ``restart`` ignores
            it and starts the stream afresh (needed when the number of devices or workers changed).
        prefetch_factor: batches prefetched per worker.
        pin_memory: pin host memory of batches (GPU training).
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
        self.streams: dict[str, ShardStream] = {}
        self._loaders: dict[str, ShardLoader] = {}

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
            )
            if self.trainer is not None:
                stream.set_distributed(self.trainer.global_rank, self.trainer.world_size)
            n = sum(len(s.urls) for s in sources)
            log.info("data.%s: %d shard(s) in %d source(s)", split, n, len(sources))
            self.streams[split] = stream
        return self.streams[split]

    def setup(self, stage: str | None = None):
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        for split in wanted.get(stage, ["train", "val", "test", "predict"]):
            if self.specs.get(split) is not None:
                self._stream(split)

    def _loader(self, split: str) -> ShardLoader:
        stream = self._stream(split)
        bs = self.batch_size if split == "train" else self.val_batch_size
        kw = dict(prefetch_factor=self.prefetch_factor) if self.num_workers > 0 else {}
        loader = ShardLoader(stream, batch_size=bs, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                    collate_fn=CollateWithStats(self.processor), **kw)
        loader.restart = self.resume == "restart"
        self._loaders[split] = loader
        return loader

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val") if self.specs["val"] is not None else []

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("predict")
