"""Decoding shard members: decompression bombs refused from the header, .npy reasons."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from kelix.data.decode import DEFAULT_MAX_PIXELS, decode_fields, decode_image
from kelix.data.schema import SampleError
from kelix.data.shards import Source
from kelix.data.stream import ShardStream
from tests.conftest import jpeg_bytes, write_shard


def blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of any size, built row by row (never held as pixels): 20000 x 20000 is 48 kB."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * min(1000, height - i)) for i in range(0, height, 1000)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def loads(monkeypatch):
    """Every image decode (``load``) called while the test runs."""
    calls = []
    for cls in (Image.Image, ImageFile.ImageFile):
        original = cls.load
        monkeypatch.setattr(cls, "load", lambda self, _o=original: calls.append(self.size) or _o(self))
    return calls


def test_the_small_png_helper_is_a_real_image():
    assert decode_image(blank_png(40, 30)).size == (40, 30)
    assert len(blank_png(20000, 20000)) < 100_000


@pytest.mark.parametrize("size, max_pixels", [
    ((20000, 20000), DEFAULT_MAX_PIXELS),  # above PIL's error threshold too
    ((9000, 9000), DEFAULT_MAX_PIXELS),  # 81M: below PIL's 89M warning, above the kit's 64M
    ((10000, 10000), 10**9),  # a higher kit limit: PIL's warning (100M > 89M) becomes the refusal
    ((300, 200), 300 * 200 - 1),  # a configured limit applies to ordinary images too
])
def test_an_image_over_the_pixel_limit_is_refused_before_decoding(loads, size, max_pixels):
    with pytest.raises(SampleError, match="pixel") as e:
        decode_image(blank_png(*size), max_pixels=max_pixels)
    assert e.value.reason == "too_many_pixels"
    assert loads == []  # never decoded: refused from the header
    assert decode_image(blank_png(300, 200), max_pixels=300 * 200).size == (300, 200)
    assert loads and set(loads) == {(300, 200)}  # load() is what decodes (PIL calls it more than once)


def test_a_decompression_bomb_in_a_shard_is_skipped_and_counted(tmp_path, loads):
    seg = {"segments": [{"type": "image", "image": "0.png"}, {"type": "text", "text": "x"}]}
    shard = write_shard(tmp_path / "bomb.tar", [{"__key__": "ok1", "json": seg, "0.png": jpeg_bytes()},
                                                {"__key__": "bomb", "json": seg, "0.png": blank_png(20000, 20000)},
                                                {"__key__": "ok2", "json": seg, "0.png": jpeg_bytes()}])
    s = ShardStream([Source(shard)], repeat=False, shuffle_buffer=1)
    assert [x.key for x in s] == ["ok1", "ok2"]
    assert {k: v for k, v in s.stats.items() if k.startswith("skipped/")} == {"skipped/too_many_pixels": 1}
    assert all(w * h < 10**6 for w, h in loads)
    small = ShardStream([Source(shard)], repeat=False, shuffle_buffer=1, max_image_pixels=100)
    assert list(small) == []  # every image is over 100 pixels
    assert small.stats["skipped/too_many_pixels"] == 3


def npy(arr, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("name, data, reason", [
    ("cond.npy", npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True), "object_npy"),
    ("0.codes.npy", npy(np.array([[1, "x"]], dtype=object), allow_pickle=True), "object_npy"),
    ("cond.npy", b"\x93NUMPY garbage", "bad_npy"),
    ("cond.npy", npy(np.zeros(4))[:-8], "bad_npy"),  # cut short
    ("0.codes.npy", npy(np.zeros((2, 2), np.int16)), "bad_codes"),  # not [h, w, N]
    ("0.codes.npy", npy(np.zeros((2, 2, 1), np.float32)), "bad_codes"),  # not integers
])
def test_npy_fields_are_refused_with_the_right_reason(name, data, reason):
    with pytest.raises(SampleError, match=f"shard.tar:k: field '{name}'") as e:
        decode_fields({"__key__": "k", name: data}, "shard.tar", "k")
    assert e.value.reason == reason
    ok = decode_fields({"cond.npy": npy(np.arange(6).reshape(2, 3))}, "s", "k")
    assert ok["cond.npy"].tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("lazy", [False, True])
def test_a_truncated_jpeg_is_corrupt_even_when_another_library_allows_truncated_images(monkeypatch, lazy):
    """lmms-eval sets PIL's global LOAD_TRUNCATED_IMAGES on import; the kit still skips a cut file."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buf, "JPEG")
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises((SampleError, OSError)):
        img = decode_image(cut, lazy=lazy)
        np.asarray(img)  # a lazy image decodes on first use
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is left as it was
