"""Explicit, safe decoding of shard members.

Only the extensions listed here are decoded. Pickle-bearing members (``.pyd``, ``.pkl``, ``.pth``...)
are never even read out of the tar: webdataset's automatic decoders would unpickle them, which runs
arbitrary code from the data.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image as PILImage

from kelix.data.schema import IMAGE_EXTS, SampleError

# Never read out of a shard, whatever it contains.
UNSAFE_EXTS = ("pyd", "pickle", "pkl", "pth", "pt", "ckpt", "bin", "joblib", "npz")
DECODED_EXTS = (*IMAGE_EXTS, "json", "txt", "npy", "cls")

# Decompression bombs: refuse images with more pixels than this before decoding them.
PILImage.MAX_IMAGE_PIXELS = 16384 * 16384


def extension(field: str) -> str:
    return field.rsplit(".", 1)[-1].lower()


def is_wanted(fname: str) -> bool:
    """Filter for tar members: keep what we decode, drop everything else unread."""
    return extension(fname) in DECODED_EXTS


def decode_image(data: bytes) -> PILImage.Image:
    img = PILImage.open(io.BytesIO(data))
    img.load()  # force the full decode now, so a truncated file fails here, not in the model
    return img.convert("RGB")


def decode_fields(raw: dict, shard: str, key: str) -> dict:
    """Decode the known fields of a raw sample; raise :class:`SampleError` naming the bad field."""
    out = {}
    for name, value in raw.items():
        if name.startswith("__"):
            continue
        ext = extension(name)
        try:
            if ext in IMAGE_EXTS:
                out[name] = decode_image(value)
            elif ext == "json":
                out[name] = json.loads(value)
            elif ext in ("txt", "cls"):
                text = value.decode("utf-8")
                out[name] = int(text) if ext == "cls" else text
            elif ext == "npy":
                arr = np.load(io.BytesIO(value), allow_pickle=False)
                if name.endswith("codes.npy") and (arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer)):
                    raise ValueError(f"codes must be an integer array [h, w, N], got {arr.dtype} {arr.shape}")
                out[name] = arr
        except Exception as e:  # noqa: BLE001 - every failure becomes a counted skip
            reason = {"json": "bad_json", "npy": "bad_codes"}.get(ext, "corrupt_image" if ext in IMAGE_EXTS else "bad_field")
            raise SampleError(reason, f"{shard}:{key}: field {name!r} cannot be decoded: {type(e).__name__}: {e}") from e
    return out
