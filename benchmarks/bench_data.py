"""Shard streaming throughput: decode + schema + native-resolution resize, by number of workers."""

from __future__ import annotations

import argparse
import tempfile
import time

from PIL import Image
from torchdata.stateful_dataloader import StatefulDataLoader

from benchmarks.common import report
from kelix.data.images import ImageConfig, resize_image, to_tensor
from kelix.data.processor import Processor
from kelix.data.shards import Source
from kelix.data.stream import ShardStream
from kelix.data.synthetic import SyntheticData


class Resize(Processor):
    def __init__(self):
        self.cfg = ImageConfig(max_pixels=28 * 28 * 64)

    def __call__(self, sample):
        return sum(to_tensor(resize_image(im.pixels, self.cfg), self.cfg).numel() for im in sample.images)

    def collate(self, items):
        return items


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=512)
    a = p.parse_args(argv)
    root = tempfile.mkdtemp()
    SyntheticData(root, ["ocr", "caption", "vqa", "t2i"], shards_per_task=2, samples_per_shard=a.samples // 8).ensure()
    results = {}
    resize_image(Image.new("RGB", (64, 64)), ImageConfig())  # import transformers once, outside the timing
    for workers in (0, 2):
        stream = ShardStream([Source(f"{root}/*.tar")], processor=Resize(), repeat=False, shuffle_buffer=64)
        loader = StatefulDataLoader(stream, batch_size=16, num_workers=workers, collate_fn=Resize().collate)
        t = time.perf_counter()
        n = sum(len(b) for b in loader)
        results[f"workers_{workers}"] = {"samples": n, "samples_per_s": round(n / (time.perf_counter() - t), 1)}
    return report("data_stream", **results)


if __name__ == "__main__":
    main()
