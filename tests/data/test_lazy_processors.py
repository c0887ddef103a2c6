"""The kit's processors on a lazily decoding stream: every image they keep is decoded inside the
processor (in the worker), so a corrupt one is a counted ``corrupt_image`` skip there, never an
exception in the training step; a filtered one is never decoded."""

import io

import numpy as np
import torch
from PIL import Image

from benchmarks.bench_data import photo_jpeg
from kelix.data.decode import is_lazy
from kelix.data.images import ImageConfig
from kelix.data.shards import Source
from kelix.data.stream import ShardStream
from kelix.dit.data import DiTProcessor
from kelix.llm.data import LLMProcessor
from kelix.tokenizer.data import TokenizerProcessor
from tests.conftest import write_shard
from tests.data import test_decode

SEG = {"segments": [{"type": "image", "image": "0.jpg"}, {"type": "text", "text": "a photo"}]}
loads = test_decode.loads  # the fixture recording the size of every image decode
IMAGE = ImageConfig(min_pixels=56 * 56, max_pixels=112 * 112, aspect_range=(0.5, 2.0))


def _jpeg(w, h, seed):
    return photo_jpeg(w, h, seed=seed)


def _shard(tmp_path, size=(56, 56)):
    """A good JPEG, a truncated one (its header intact: it opens and fails when decoded), and a wide one."""
    good, cut = _jpeg(*size, seed=1), _jpeg(*size, seed=2)
    latent = io.BytesIO()
    np.save(latent, np.zeros((4, 2, 2), np.float16))
    recs = [{"__key__": "good", "json": SEG, "0.jpg": good}, {"__key__": "cut", "json": SEG, "0.jpg": cut[: len(cut) // 2]},
            {"__key__": "wide", "json": SEG, "0.jpg": _jpeg(size[0] * 3, size[1], seed=3)}]
    for r in recs:
        r["latent.npy"] = latent.getvalue()
    return write_shard(tmp_path / "s.tar", recs)


def _no_lazy(x):
    """No undecoded image anywhere in an item."""
    if isinstance(x, Image.Image):
        return not is_lazy(x)
    if isinstance(x, dict):
        return all(_no_lazy(v) for v in x.values())
    if isinstance(x, list | tuple):
        return all(_no_lazy(v) for v in x)
    return not hasattr(x, "images") or all(_no_lazy(getattr(i, "pixels", None)) for i in x.images)


def _run(processor, shard):
    s = ShardStream([Source(shard)], processor=processor, repeat=False, shuffle_buffer=1)
    items = list(s)
    assert all(_no_lazy(it) for it in items)
    return items, {k: v for k, v in s.stats.items() if k.startswith("skipped/")}


def test_a_dit_condition_image_already_square_is_decoded_in_the_processor(tmp_path, loads):
    shard = _shard(tmp_path)
    loads.clear()
    p = DiTProcessor(target="latents", condition="llm", condition_size=56, aspect_range=(0.5, 2.0))
    items, skipped = _run(p, shard)
    assert [it["key"] for it in items] == ["good"] and items[0]["cond_image"].size == (56, 56)
    assert skipped == {"skipped/corrupt_image": 1, "skipped/aspect_ratio": 1}
    want = Image.open(io.BytesIO(_jpeg(56, 56, seed=1))).convert("RGB")
    assert np.array_equal(np.asarray(items[0]["cond_image"]), np.asarray(want))
    assert (168, 56) not in loads  # the wide image was filtered by its header, never decoded


def test_llm_and_tokenizer_processors_skip_a_corrupt_lazy_image_as_corrupt_image(tmp_path, loads):
    shard = _shard(tmp_path, size=(300, 200))
    loads.clear()
    llm = LLMProcessor("builtin:bytes", N=4, K=32, image=IMAGE)
    tok = TokenizerProcessor("builtin:bytes", IMAGE)
    for p in (llm, tok):
        items, skipped = _run(p, shard)
        assert len(items) == 1, type(p).__name__
        assert skipped == {"skipped/corrupt_image": 1, "skipped/aspect_ratio": 1}, type(p).__name__
    (doc,), _ = _run(llm, shard)
    (img,) = doc.images
    assert img.pixels.dtype == torch.uint8 and tuple(img.pixels.shape) == (3, 84, 112)  # normalised on the device
    assert (900, 200) not in loads  # the wide image was filtered by its header, never decoded
