"""Processors turn a :class:`~kelix.data.schema.Sample` into a model-ready item, and items into a batch.

A processor runs inside dataloader workers, so it must be picklable and hold no CUDA state. Each
component ships its own (tokenizer, LLM, DiT); a user's processor is plugged by ``class_path``.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import default_collate

from kelix.data.schema import Sample


class Processor:
    """Base class: override ``__call__`` (per sample) and, if needed, ``collate`` (per batch).

    ``__call__`` may return None or raise :class:`~kelix.data.schema.SampleError` to skip a sample;
    the stream counts and logs it.
    """

    def __call__(self, sample: Sample) -> Any:
        return sample

    def collate(self, items: list) -> Any:
        if items and isinstance(items[0], Sample):
            return items
        return default_collate(items)


class CollateWithStats:
    """Collate ``(item, stats)`` pairs: the batch gets ``data_stats``, the worker's running counts.

    All items of a batch come from one worker, so the last stats of the batch are that worker's
    current totals; :class:`kelix.training.callbacks.DataHealth` turns them into TensorBoard scalars.
    """

    def __init__(self, processor: Processor):
        self.processor = processor

    def __call__(self, pairs: list) -> Any:
        batch = self.processor.collate([item for item, _ in pairs])
        if isinstance(batch, dict):
            batch["data_stats"] = pairs[-1][1]
        return batch


PADDING_KEY = "padding_batch"


def as_padding(batch: Any) -> dict:
    """A copy of a (dict) batch marked as padding: run for the collectives, counted for nothing.

    A rank that has run out of validation batches runs these while the others finish theirs (see
    :class:`kelix.data.datamodule.ShardDataModule`).
    """
    if not isinstance(batch, dict):
        raise TypeError(f"ranks hold different numbers of evaluation batches, and a {type(batch).__name__} batch "
                        "cannot be marked as padding: the processor's collate must return a dict")
    return {**batch, PADDING_KEY: True}


def is_padding(batch: Any) -> bool:
    return isinstance(batch, dict) and bool(batch.get(PADDING_KEY, False))
