"""Fixtures for the converter tests: images of distinct sizes and colours, and reading shards back."""

import glob
import io
import json
import os

from PIL import Image

from kelix.data.convert.formats import Options
from kelix.data.convert.job import Job, run
from kelix.data.datamodule import ShardDataModule


def png(color, size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def images(folder, specs: dict) -> dict:
    """Write ``{name: (color, (w, h))}`` as image files; ``bad.jpg`` is not an image."""
    os.makedirs(folder, exist_ok=True)
    for name, (color, size) in specs.items():
        Image.new("RGB", size, color).save(os.path.join(folder, name))
    with open(os.path.join(folder, "bad.jpg"), "wb") as f:
        f.write(b"not an image at all")
    return specs


def convert(fmt, inputs, out, workers=1, shard_size=2, **opts):
    split = opts.pop("hf_split", None)
    job = Job(fmt, [str(p) for p in inputs], str(out), shard_size, None, Options(**opts), split)
    return run(job, workers=workers, progress=False)


def read_back(out, manifest):
    """Every sample of the shards through ShardDataModule (val loader: in order, each once), checking that
    the stream skipped nothing and that the manifest's counts are the samples read."""
    pattern = os.path.join(str(out), "*.tar")
    dm = ShardDataModule(val=pattern, num_workers=0, val_batch_size=3)
    dm.setup("validate")
    samples = [s for batch in dm.val_dataloader() for s in batch]
    stats = dm.streams["val"].stats
    assert not {k: v for k, v in stats.items() if k.startswith("skipped/")}, stats
    assert len(samples) == manifest["totals"]["samples"] == sum(s["samples"] for s in manifest["shards"].values())
    assert sorted(os.path.basename(p) for p in glob.glob(pattern)) == sorted(manifest["shards"])
    assert len({s.key for s in samples}) == len(samples)
    return samples


def skipped(manifest) -> list[tuple[str, int, str]]:
    return [(os.path.basename(s["source"]), s["row"], s["reason"]) for s in manifest["skipped"]]


def write_jsonl(path, records, bad_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            f.write((bad_lines[i] if i in bad_lines else json.dumps(r)) + "\n")
    return path
