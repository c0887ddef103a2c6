"""Data fast paths against their eager paths: lazy decode (the header's size read first, so filtered
images are never decoded), JPEG draft decoding, ``reducing_gap`` resizes, uint8 until the device, and
skip messages without object addresses.

Tolerances (photo-like JPEGs, 0..255 levels): draft decode + resize vs full decode + resize, mean
absolute difference <= 1 level and 99th percentile <= 4 levels (hard edges differ more on rare pixels);
``reducing_gap=3`` vs one bicubic resize: mean <= 0.5, p99 <= 3; uint8 + normalize vs to_tensor: 1e-6.
"""

import gc
import io
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from benchmarks.bench_data import photo, photo_jpeg
from kelix.data.decode import decode_fields, decode_image, describe_error, is_lazy
from kelix.data.images import ImageConfig, normalize, resize_image, to_tensor, to_uint8_tensor
from kelix.data.schema import SampleError, parse_sample
from tests.data import test_decode

loads = test_decode.loads  # the fixture counting image decodes (sizes of every load)


@pytest.fixture
def drafts(monkeypatch):
    """(requested size, decoded size) of every JPEG draft."""
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = original(self, mode, size)
        calls.append((size, self.size))
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


def eager(cfg: ImageConfig) -> ImageConfig:
    return replace(cfg, draft=False, reducing_gap=None)


def levels(a: Image.Image, b: Image.Image) -> np.ndarray:
    assert a.size == b.size and a.mode == b.mode == "RGB"
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))


@pytest.mark.parametrize("size, max_tokens, scale", [((1600, 1200), 64, 4), ((1200, 1600), 256, 2), ((2400, 1000), 16, 8)])
def test_draft_decode_is_within_tolerance_of_the_full_decode(drafts, size, max_tokens, scale):
    data = photo_jpeg(*size, seed=sum(size))
    cfg = ImageConfig(max_pixels=28 * 28 * max_tokens)
    fast = resize_image(decode_image(data, lazy=True), cfg)
    full = resize_image(decode_image(data), eager(cfg))
    (want, decoded), = drafts  # one draft, by the expected power of two, never below the target
    assert want == fast.size and decoded == tuple(-(-s // scale) for s in size)
    assert decoded[0] >= fast.size[0] and decoded[1] >= fast.size[1]
    d = levels(fast, full)
    assert d.mean() <= 1.0 and np.percentile(d, 99) <= 4, (d.mean(), np.percentile(d, 99))
    assert d.mean() > 0  # it did take the other path


def test_no_draft_below_a_2x_downscale_and_none_when_disabled(drafts):
    data = photo_jpeg(600, 450, seed=1)
    cfg = ImageConfig(max_pixels=28 * 28 * 200)  # ~ 448x336: less than 2x smaller
    assert np.array_equal(np.asarray(resize_image(decode_image(data, lazy=True), cfg)),
                          np.asarray(resize_image(decode_image(data), eager(cfg))))
    small = ImageConfig(max_pixels=28 * 28 * 16, draft=False, reducing_gap=None)
    assert np.array_equal(np.asarray(resize_image(decode_image(data, lazy=True), small)),
                          np.asarray(decode_image(data).resize(resize_image(decode_image(data), small).size,
                                                               Image.BICUBIC)))
    assert drafts == []


def test_reducing_gap_resize_is_within_tolerance_of_one_bicubic_resize():
    img = photo(1800, 1350, seed=3)  # a PNG-like source (no draft): only the resize differs
    cfg = ImageConfig(max_pixels=28 * 28 * 16)  # ~ 112x112 x 1.33: a 12x downscale
    fast, plain = resize_image(img, cfg), resize_image(img, eager(cfg))
    d = levels(fast, plain)
    assert 0 < d.mean() <= 0.5 and np.percentile(d, 99) <= 3
    with pytest.raises(ValueError, match="reducing_gap 0.5 must be >= 1"):
        ImageConfig(reducing_gap=0.5)


def test_an_image_filtered_by_its_header_is_never_decoded(loads):
    wide, extreme = photo_jpeg(900, 200, seed=4), photo_jpeg(2100, 10, seed=5)
    loads.clear()  # making them decoded
    raw = {"__key__": "k", "json": b'{"segments": [{"type": "image", "image": "0.jpg"}]}', "0.jpg": wide}
    sample = parse_sample(decode_fields(raw, "s.tar", "k", lazy=True), "s.tar", "k")
    pixels = sample.images[0].pixels
    assert is_lazy(pixels) and pixels.size == (900, 200)
    with pytest.raises(SampleError, match=r"s.tar:k: image 900x200 has aspect 4.50 outside") as e:
        resize_image(pixels, ImageConfig(aspect_range=(0.75, 1.33)), where="s.tar:k")
    assert e.value.reason == "aspect_ratio"
    with pytest.raises(SampleError) as e:  # over smart_resize's aspect limit of 200
        resize_image(decode_image(extreme, lazy=True), ImageConfig())
    assert e.value.reason == "aspect_ratio"
    with pytest.raises(SampleError) as e:
        decode_fields(raw, "s.tar", "k", max_pixels=1000, lazy=True)
    assert e.value.reason == "too_many_pixels"
    assert loads == []  # no pixel decoded for any of them
    assert resize_image(pixels, ImageConfig(max_pixels=28 * 28 * 16)).size[0] > 0 and loads  # a kept one is


def test_lazy_and_eager_decodes_give_the_same_rgb_images():
    rgb = photo(300, 200, seed=6)
    cases = {"JPEG": rgb, "PNG": rgb, "grey JPEG": rgb.convert("L"), "RGBA PNG": rgb.convert("RGBA"),
             "palette PNG": rgb.convert("P")}
    for name, img in cases.items():
        buf = io.BytesIO()
        img.save(buf, format=name.split()[-1])
        lazy, full = decode_image(buf.getvalue(), lazy=True), decode_image(buf.getvalue())
        assert lazy.mode == full.mode == "RGB", name
        assert is_lazy(lazy) == (img.mode == "RGB"), name  # other modes are converted at once
        assert np.array_equal(np.asarray(lazy), np.asarray(full)), name
        assert not is_lazy(lazy)


def test_a_corrupt_lazy_image_is_a_corrupt_image_skip_on_first_use():
    data = photo_jpeg(400, 300, seed=7)
    cut = data[: len(data) // 2]  # the header is intact: it opens, and fails when decoded
    raw = {"__key__": "k", "json": b'{"segments": [{"type": "image", "image": "0.jpg"}]}', "0.jpg": cut}
    pixels = decode_fields(raw, "s.tar", "k", lazy=True)["0.jpg"]
    with pytest.raises(SampleError, match=r"^s.tar:k: field '0.jpg' cannot be decoded: OSError: image file is "
                                          r"truncated") as e:
        to_tensor(resize_image(pixels, ImageConfig()), ImageConfig())
    assert e.value.reason == "corrupt_image"
    with pytest.raises(SampleError) as eager_error:
        decode_fields(raw, "s.tar", "k")
    assert eager_error.value.reason == "corrupt_image" and "0x" not in str(eager_error.value)


def test_skip_messages_name_the_field_and_carry_no_object_address():
    raw = {"__key__": "k", "json": b'{"segments": [{"type": "image", "image": "0.jpg"}]}', "0.jpg": b"not an image" * 9}
    with pytest.raises(SampleError) as e:
        decode_fields(raw, "a/s.tar", "k", lazy=True)
    assert e.value.reason == "corrupt_image"
    assert str(e.value) == ("a/s.tar:k: field '0.jpg' cannot be decoded: UnidentifiedImageError: not an image format "
                            "PIL reads (unknown or damaged header)")
    img = Image.open(io.BytesIO(photo_jpeg(64, 48)))
    msg = describe_error(TypeError(f"cannot use {img!r} with {io.BytesIO()!r}"))
    assert msg == "TypeError: cannot use a 64x48 RGB image with a BytesIO"


def test_a_lazy_image_is_freed_without_the_garbage_collector():
    gc.disable()
    try:
        img = decode_image(photo_jpeg(64, 48), lazy=True)
        np.asarray(img)  # decoded through the stand-in load
        ref = weakref.ref(img)
        del img
        assert ref() is None  # no reference cycle holds the pixels
    finally:
        gc.enable()


def test_uint8_until_the_device_then_normalize_equals_to_tensor():
    cfg = ImageConfig(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    img = photo(97, 61, seed=8)
    x = to_uint8_tensor(img)
    assert x.dtype == torch.uint8 and x.shape == (3, 61, 97) and x.is_contiguous()
    want = to_tensor(img, cfg)
    torch.testing.assert_close(normalize(x, cfg), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(normalize(torch.stack([x, x]), cfg)[1], want, atol=1e-6, rtol=0)  # batched too
    assert to_uint8_tensor(img.convert("L")).shape == (3, 61, 97)


class _Resize:
    """A processor that sizes its image as the kit's do: header checks, then decode and resize."""

    cfg = ImageConfig(max_pixels=28 * 28 * 16, aspect_range=(0.5, 2.0))

    def __call__(self, sample):
        return sample.key, tuple(to_uint8_tensor(resize_image(sample.images[0].pixels, self.cfg)).shape)


def test_a_stream_with_a_processor_decodes_lazily_and_skips_by_the_header(tmp_path, loads, drafts):
    from kelix.data.shards import Source
    from kelix.data.stream import ShardStream
    from tests.conftest import write_shard

    seg = {"segments": [{"type": "image", "image": "0.jpg"}]}
    photo_bytes, wide, cut = photo_jpeg(640, 480, seed=9), photo_jpeg(900, 200, seed=10), photo_jpeg(400, 300)
    shard = write_shard(tmp_path / "s.tar", [{"__key__": "ok", "json": seg, "0.jpg": photo_bytes},
                                             {"__key__": "wide", "json": seg, "0.jpg": wide},
                                             {"__key__": "cut", "json": seg, "0.jpg": cut[: len(cut) // 2]}])
    loads.clear()
    s = ShardStream([Source(shard)], processor=_Resize(), repeat=False, shuffle_buffer=1)
    assert [key for key, _ in s] == ["ok"]
    assert {k: v for k, v in s.stats.items() if k.startswith("skipped/")} == {
        "skipped/aspect_ratio": 1, "skipped/corrupt_image": 1}
    assert (900, 200) not in loads and (640, 480) not in loads  # never decoded; the kept one at a draft scale
    assert drafts and drafts[0][1] == (160, 120)
    loads.clear()
    plain = ShardStream([Source(shard)], repeat=False, shuffle_buffer=1)  # no processor: every image decoded now
    assert [x.key for x in plain] == ["ok", "wide"] and plain.stats["skipped/corrupt_image"] == 1
    assert (640, 480) in loads and (900, 200) in loads
