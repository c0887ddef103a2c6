"""Explicit, safe decoding of shard members.

Only the extensions listed here are decoded. Pickle-bearing members (``.pyd``, ``.pkl``, ``.pth``...)
are never even read out of the tar: webdataset's automatic decoders would unpickle them, which runs
arbitrary code from the data; an object-dtype ``.npy`` (a pickle inside) is refused from its header.

Decompression bombs (a small file of huge dimensions: a 1.2 MB 20000x20000 PNG decodes to 1.2 GB
of RGB) are refused from the image header, before any pixel is decoded: above ``max_pixels`` (or
PIL's own ``Image.MAX_IMAGE_PIXELS``, whichever is lower) the sample is skipped (``too_many_pixels``).

With ``lazy`` an RGB image is returned with its header read and its pixels not yet decoded: a
processor that filters it by size or aspect never pays for the decode, and
:func:`kelix.data.images.resize_image` can decode a large JPEG at a reduced scale (draft mode). A
decode error then surfaces when the pixels are first used, as the same ``corrupt_image``
:class:`SampleError`. Skip messages carry no object addresses (PIL's reprs name them).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
import weakref

import numpy as np
from PIL import Image as PILImage
from PIL import ImageFile

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


_PIL_IMAGE = re.compile(r"<PIL\.[\w.]+ image mode=(\S+) size=(\d+x\d+) at 0x[0-9A-Fa-f]+>")
_OBJECT = re.compile(r"<([\w.]+) object at 0x[0-9A-Fa-f]+>")


def describe_error(e: BaseException) -> str:
    """``Type: message`` of a decoder error, readable and reproducible: object reprs lose their addresses."""
    if isinstance(e, PILImage.UnidentifiedImageError):
        return "UnidentifiedImageError: not an image format PIL reads (unknown or damaged header)"
    msg = _OBJECT.sub(lambda m: f"a {m.group(1).rsplit('.', 1)[-1]}", _PIL_IMAGE.sub(r"a \2 \1 image", str(e)))
    return f"{type(e).__name__}: {re.sub(r' at 0x[0-9A-Fa-f]+', '', msg)}"


@contextlib.contextmanager
def _strict_truncation():
    """PIL decodes a truncated file without error when its global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is
    set, which another library may do on import (lmms-eval does): the kit skips such a sample as
    ``corrupt_image`` whatever that flag says, so it is off while the kit decodes."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


class _CheckedLoad:
    """Stands in for a lazy image's ``load``: a decode error becomes ``corrupt_image`` naming the field.

    PIL's own methods (convert, resize, numpy conversion) all call ``self.load()``, so every first
    use of the pixels goes through here. It holds the image weakly (no reference cycle keeps a
    decoded image alive after the sample is gone).
    """

    def __init__(self, img: PILImage.Image, where: str):
        self.img, self.where = weakref.ref(img), where

    def __call__(self):
        img = self.img()
        try:
            with _strict_truncation():
                return type(img).load(img)
        except Exception as e:  # noqa: BLE001 - any decoder failure is one skipped sample
            raise SampleError("corrupt_image", f"{self.where} cannot be decoded: {describe_error(e)}") from e


def is_lazy(img: PILImage.Image) -> bool:
    """Whether ``img`` came from :func:`decode_image` with ``lazy`` and is not decoded yet."""
    return isinstance(img.__dict__.get("load"), _CheckedLoad) and bool(getattr(img, "tile", None))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, lazy: bool = False,
                 where: str = "image") -> PILImage.Image:
    """Decode an image to RGB; over ``max_pixels`` raise :class:`SampleError` ``too_many_pixels``
    from the header alone (``Image.open`` reads only the header; ``load`` decodes).

    ``lazy``: an RGB image is returned undecoded (its size is the header's), decoded on first use;
    other modes (grey, palette, CMYK, alpha) are decoded and converted now, as without ``lazy``.
    ``where`` names the image in the error of a deferred decode.
    """
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
        if lazy and img.mode == "RGB":
            img.load = _CheckedLoad(img, where)
            return img
        with _strict_truncation():
            img.load()  # force the full decode now, so a truncated file fails here, not in the model
    return img if img.mode == "RGB" else img.convert("RGB")


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


def decode_fields(raw: dict, shard: str, key: str, max_pixels: int = DEFAULT_MAX_PIXELS, lazy: bool = False) -> dict:
    """Decode the known fields of a raw sample; raise :class:`SampleError` naming the bad field.

    ``lazy``: RGB images are left undecoded until first used (see :func:`decode_image`).
    """
    out = {}
    for name, value in raw.items():
        if name.startswith("__"):
            continue
        ext = extension(name)
        try:
            if ext in IMAGE_EXTS:
                out[name] = decode_image(value, max_pixels, lazy, where=f"{shard}:{key}: field {name!r}")
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
            raise SampleError(reason, f"{shard}:{key}: field {name!r} cannot be decoded: {describe_error(e)}") from e
    return out
