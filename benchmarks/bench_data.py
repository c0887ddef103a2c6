"""Streaming data pipeline against the LLM step that consumes it (JSON name ``data_stream``).

Writes caption shards with real-size photo-like JPEGs, then measures samples/s of the training loader
(``ShardDataModule``: tar reading, decode, native-resolution resize, block layout, packing) with 1 and
2 workers, next to samples/s of the LLM training step on batches of the same layout on the same
machine (codes stand in for the pixels: the step's image-tokenizer encode is left out, which makes the
step faster and the ratio stricter). ``loader_over_step`` uses the most workers measured; >= 1.5 means
the loader is never the bottleneck. One image's decode-to-tensor time is reported both ways: the fast
path (lazy decode, JPEG draft, ``reducing_gap``, uint8) and the eager one (full decode, one resize, float).

CPU default: 2000x1500 JPEGs, 64-token images, the tiny LLM. GPU default: 4000x3000 (12 MP) JPEGs,
native resolution up to 1280 tokens (~1 MP), Qwen3-0.6B-sized random LLM, rows of 4096 blocks.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from benchmarks.common import report, time_train_step, timeit


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour fields, mid-frequency texture, sensor noise, hard-edged
    shapes and text (what JPEG and resizing meet in real data), built in well under a second at 12 MP."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[0:height, 0:width]
    field = np.stack([128 + 60 * np.sin(xx / (width / 13) + c) + 40 * np.cos(yy / (height / 15) - c)
                      for c in range(3)], -1)
    coarse = rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    noise = np.tile(rng.normal(0, 6, (256, 256, 3)), (height // 256 + 1, width // 256 + 1, 1))[:height, :width]
    img = Image.fromarray(np.clip(field + 0.25 * (texture - 128) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12 + width * height // 400_000):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        sw, sh = (int(v) for v in rng.integers(max(2, width // 100), max(3, width // 8), 2))
        draw.rectangle([x, y, x + sw, y + sh], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw.text((x, y), "Kelix sample 0123", fill=(0, 0, 0))
    return img


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    photo(width, height, seed).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_shards(root: str, samples: int, size: tuple[int, int], distinct: int = 4,
                 shards: int = 4) -> tuple[list[str], bytes]:
    """Caption samples with one ``size`` JPEG each (``distinct`` different photos, reused); the shard
    paths and the first photo's bytes."""
    from kelix.data.writer import ShardSink

    jpegs = [photo_jpeg(*size, seed=i) for i in range(distinct)]
    with ShardSink(root, prefix="photos", max_count=-(-samples // shards)) as sink:
        for i in range(samples):
            msg = [{"role": "user", "content": [{"type": "image", "image": "0.jpg"},
                                                {"type": "text", "text": "Describe the photo."}]},
                   {"role": "assistant", "content": f"Photo {i}: coloured fields, shapes and a line of text."}]
            sink.write({"__key__": f"p{i:06d}", "json": json.dumps({"messages": msg}).encode(),
                        "0.jpg": jpegs[i % distinct]})
    return sink.paths, jpegs[0]


def one_image_ms(data: bytes, cfg) -> dict:
    """Decode-to-tensor milliseconds of one JPEG, fast path vs eager path, and how far apart they land."""
    from kelix.data.decode import decode_image
    from kelix.data.images import normalize, resize_image, to_tensor, to_uint8_tensor

    eager_cfg = replace(cfg, draft=False, reducing_gap=None)

    def fast():
        return to_uint8_tensor(resize_image(decode_image(data, lazy=True), cfg))

    def eager():
        return to_tensor(resize_image(decode_image(data), eager_cfg), eager_cfg)

    a, b = normalize(fast(), cfg), eager()
    return {"image_ms_fast": round(1e3 * timeit(fast, warmup=1, repeat=3), 1),
            "image_ms_eager": round(1e3 * timeit(eager, warmup=1, repeat=3), 1),
            "image_target": list(b.shape), "image_fast_vs_eager_mean_abs": round(float((a - b).abs().mean()), 5)}


def loader_rate(urls, processor, batch_size: int, workers: int, batches: int) -> dict:
    """Samples/s of the training loader after its first batch (worker start-up left out)."""
    from kelix.data.datamodule import ShardDataModule

    dm = ShardDataModule(train=urls, processor=processor, batch_size=batch_size, num_workers=workers,
                         shuffle_buffer=16, seed=0)
    it = iter(dm.train_dataloader())
    first = next(it)
    t, n = time.perf_counter(), 0
    for _ in range(batches):
        n += next(it)["batch_size"]
    dt = time.perf_counter() - t
    del it
    return {"samples": n, "samples_per_s": round(n / dt, 2), "first_batch": first}


def step_rate(batch: dict, scale: str, N: int, K: int, device: str) -> dict:
    """Samples/s of the LLM's training step (forward, backward, AdamW) on ``batch``'s layout."""
    from benchmarks.bench_llm import QWEN3
    from kelix.llm.loss import nbp_loss
    from kelix.llm.model import KelixLM, LLMConfig

    cuda = device == "cuda"
    torch.manual_seed(0)
    big = scale != "tiny"
    lm = KelixLM(LLMConfig(backbone_config=QWEN3[scale], text_tokenizer="builtin:bytes", N=N, K=K,
                           visual_input="table", attn_implementation="sdpa",
                           **({} if big else dict(decoder_width=64, decoder_heads=2, decoder_ffn=128)))).to(device)
    opt = torch.optim.AdamW([q for q in lm.parameters() if q.requires_grad], lr=1e-5, fused=cuda)
    codes = batch["codes"].clone()
    if batch["image_index"]:  # random codes where the image tokenizer would write the pixels' codes
        idx = torch.cat(list(batch["image_index"]))
        codes.view(-1, N)[idx] = torch.randint(0, K, (len(idx), N), generator=torch.Generator().manual_seed(0))
    inputs = [t.to(device) for t in (batch["tokens"], codes, batch["position_ids"], batch["targets"])]
    dtype = torch.bfloat16 if cuda else torch.float32

    def loss():
        with torch.autocast(device, dtype=dtype, enabled=cuda):
            return nbp_loss(lm(*inputs), N)["loss"]

    t = time_train_step(loss, opt, repeat=5 if cuda else 2)
    return {"step_s": round(t, 4), "step_samples_per_s": round(batch["batch_size"] / t, 2),
            "step_rows": int(inputs[0].shape[0]), "step_blocks_per_row": int(inputs[0].shape[1])}


def main(argv=None):
    from kelix.data.images import ImageConfig
    from kelix.llm.data import LLMProcessor

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser()
    p.add_argument("--image-size", type=int, nargs=2, default=[4000, 3000] if cuda else [2000, 1500],
                   metavar=("W", "H"), help="JPEG size written into the shards")
    p.add_argument("--samples", type=int, default=128 if cuda else 16, help="samples written")
    p.add_argument("--batch-size", type=int, default=8 if cuda else 4)
    p.add_argument("--batches", type=int, default=8 if cuda else 2, help="batches timed per worker count")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--scale", default="0.6b" if cuda else "tiny", help="LLM size of the step (bench_llm's scales)")
    a = p.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    big = a.scale != "tiny"
    N, K = (8, 8192) if big else (4, 64)
    image = ImageConfig() if big else ImageConfig(max_pixels=28 * 28 * 64)
    processor = LLMProcessor("builtin:bytes", N=N, K=K, image=image, max_blocks=4096 if big else 256,
                             pad_to_multiple_of=64 if big else 1)
    res = {"image_size": list(a.image_size), "samples_written": a.samples, "batch_size": a.batch_size, "N": N, "K": K,
           "scale": a.scale, "device": device, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as root:
        urls, data = write_shards(root, a.samples, tuple(a.image_size))
        res.update(one_image_ms(data, image))
        rates, batch = {}, None
        for w in a.workers:
            r = loader_rate(urls, processor, a.batch_size, w, a.batches)
            batch = r.pop("first_batch")
            rates[f"workers_{w}"] = r
        res["loader"] = rates
        res["loader_workers"] = max(a.workers)
        res["loader_samples_per_s"] = rates[f"workers_{max(a.workers)}"]["samples_per_s"]
        batch_shape = list(batch["tokens"].shape)
    res.update(step_rate(batch, a.scale, N, K, device))
    res["batch_blocks"] = batch_shape
    res["loader_over_step"] = round(res["loader_samples_per_s"] / res["step_samples_per_s"], 3)
    one = rates[f"workers_{min(a.workers)}"]["samples_per_s"] / min(a.workers)
    res["workers_for_1_5x_step"] = math.ceil(1.5 * res["step_samples_per_s"] / one)  # at the fewest workers' rate
    return report("data_stream", **res)


if __name__ == "__main__":
    main()
