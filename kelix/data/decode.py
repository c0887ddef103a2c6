"""Explicit, safe decoding of shard members.

Only the extensions listed here are decoded. Pickle-bearing members (``.pyd``, ``.pkl``, ``.pth``...)
are never even read out of the tar: webdataset's automatic decoders would unpickle them, which runs
arbitrary code from the data; an object-dtype ``.npy`` (a pickle inside) is refused from its header.

Decompression bombs (a small file of huge dimensions: a 1.2 MB 20000x20000 PNG decodes to 1.2 GB
of RGB) are refused from the image header, before any pixel is decoded: above ``max_pixels`` (or
PIL's own ``Image.MAX_IMAGE_PIXELS``, whichever is lower) the sample is skipped (``too_many_pixels``).
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
from PIL import Image as PILImage

from kelix.data.schema import IMAGE_EXTS, SampleError

# Never read out of a shard, whatever it contains.
UNSAFE_EXTS = ("pyd", "pickle", "pkl", "pth", "pt", "ckpt", "bin", "joblib", "npz")
DECODED_EXTS = (*IMAGE_EXTS, "json", "txt", "npy", "cls")

# 8192 x 8192: 192 MB as RGB, far above any training resolution (images are resized after decoding).
DEFAULT_MAX_PIXELS = 8192 * 8192


def extension(field: str) -> str:
    return field.rsplit(".", 1)[-1].lower()


def is_wanted(fname: str) -> bool:
    """Filter for tar members: keep what we decode, drop everything else unread."""
    return extension(fname) in DECODED_EXTS


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> PILImage.Image:
    """Decode an image to RGB; over ``max_pixels`` raise :class:`SampleError` ``too_many_pixels``
    from the header alone (``Image.open`` reads only the header; ``load`` decodes)."""
    with warnings.catch_warnings():
        # PIL only warns between its limit and twice it, then decodes anyway: make that an error too
        warnings.simplefilter("error", PILImage.DecompressionBombWarning)
        try:
            img = PILImage.open(io.BytesIO(data))
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as e:
            raise SampleError("too_many_pixels", f"image over PIL's pixel limit: {e}") from e
        w, h = img.size
        if w * h > max_pixels:
            raise SampleError("too_many_pixels", f"image {w}x{h} has {w * h} pixels, over max_pixels = {max_pixels}")
        img.load()  # force the full decode now, so a truncated file fails here, not in the model
    return img.convert("RGB")


def _npy_is_object(data: bytes) -> bool:
    """Whether an ``.npy`` holds Python objects, read from its header (the array is not loaded)."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    return read is not None and read(f)[2].hasobject


def decode_npy(name: str, data: bytes) -> np.ndarray:
    """Load an ``.npy`` field without pickle; a ``*.codes.npy`` must be an integer ``[h, w, N]`` grid."""
    try:
        if _npy_is_object(data):
            raise SampleError("object_npy", "the array holds Python objects (dtype object), which only unpickling "
                                            "could read: store a numeric array")
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except SampleError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SampleError("bad_npy", f"not a readable .npy: {type(e).__name__}: {e}") from e
    if name.endswith("codes.npy") and (arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer)):
        raise SampleError("bad_codes", f"codes must be an integer array [h, w, N], got {arr.dtype} {arr.shape}")
    return arr


def decode_fields(raw: dict, shard: str, key: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Decode the known fields of a raw sample; raise :class:`SampleError` naming the bad field."""
    out = {}
    for name, value in raw.items():
        if name.startswith("__"):
            continue
        ext = extension(name)
        try:
            if ext in IMAGE_EXTS:
                out[name] = decode_image(value, max_pixels)
            elif ext == "json":
                out[name] = json.loads(value)
            elif ext in ("txt", "cls"):
                text = value.decode("utf-8")
                out[name] = int(text) if ext == "cls" else text
            elif ext == "npy":
                out[name] = decode_npy(name, value)
        except SampleError as e:
            raise SampleError(e.reason, f"{shard}:{key}: field {name!r}: {e}") from e
        except Exception as e:  # noqa: BLE001 - every failure becomes a counted skip
            reason = {"json": "bad_json"}.get(ext, "corrupt_image" if ext in IMAGE_EXTS else "bad_field")
            raise SampleError(reason, f"{shard}:{key}: field {name!r} cannot be decoded: {type(e).__name__}: {e}") from e
    return out
