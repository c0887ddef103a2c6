"""One source row -> one sample of the kit's schema (``{"task", "messages" | "segments"}`` + image files).

Each format is a function ``(row, opts) -> (meta, files)``; a row that cannot be used raises
:class:`RowError` with a short reason (``missing_image``, ``corrupt_image``, ``bad_json``,
``empty_text``, ``aspect_ratio``, ``schema``...), which the job records in the manifest.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass

from kelix.data.schema import SampleError

ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
        "model": "assistant", "system": "system"}
IMAGE_TAG = "<image>"
IMAGE_COLUMNS = ("image", "images", "image_path", "image_url", "file_name", "filepath", "path", "url", "jpg", "png")
TEXT_COLUMNS = ("caption", "text", "txt", "prompt", "alt", "title", "content", "sentence")
PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


class RowError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Options:
    """What a conversion reads from each row.

    Args:
        images_root: folder that relative image paths (and downloaded URLs, by file name) are under.
        image_column: column holding the image (a path, a URL already downloaded under
            ``images_root``, bytes, base64 text, or ``{"bytes", "path"}``); None: the first of
            ``IMAGE_COLUMNS`` present.
        text_column: column holding the caption / prompt / document; None: the first of ``TEXT_COLUMNS``.
        task: task label stored in each sample (None: the format's own).
        aspect_range: ``(lo, hi)`` bounds on width/height; other images are skipped (``aspect_ratio``).
            The generation stage uses 0.75-1.33 (paper 4.3.3); DiT pretraining 0.67-1.5.
        max_pixels: images over this many pixels are skipped (``too_many_pixels``), from the header.
        hf_as: which format reads the rows of an ``hf`` dataset (None: guessed from the columns).
    """

    images_root: str | None = None
    image_column: str | None = None
    text_column: str | None = None
    task: str | None = None
    aspect_range: tuple[float, float] | None = None
    max_pixels: int | None = None
    hf_as: str | None = None


# -- images
def _url_file(root: str | None, url: str) -> str:
    """Where a downloaded URL lives: ``images_root/<file name of the URL>``."""
    name = os.path.basename(url.split("?", 1)[0].rstrip("/")) or hashlib.sha1(url.encode()).hexdigest()
    return os.path.join(root or ".", name)


def image_data(value, opts: Options, what: str = "image") -> bytes:
    """The encoded bytes of an image value; RowError when absent or not a file."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path") or value.get("url")
    if value is None or value == "":
        raise RowError("missing_image", f"{what} is empty")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if hasattr(value, "save"):  # a PIL image (datasets with decoding on)
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    if not isinstance(value, str):
        raise RowError("schema", f"{what} is a {type(value).__name__}, not a path, URL or bytes")
    if value.startswith(("http://", "https://")):
        path = _url_file(opts.images_root, value)
    elif value.startswith("data:image/") and "," in value:
        return base64.b64decode(value.split(",", 1)[1])
    else:
        path = value if os.path.isabs(value) or not opts.images_root else os.path.join(opts.images_root, value)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise RowError("missing_image", f"{what} {value!r}: cannot read {path} ({e.strerror or e})") from e


def checked_image(data: bytes, opts: Options, what: str = "image") -> tuple[bytes, str, tuple[int, int]]:
    """Decode once (refusing undecodable, bomb-sized and out-of-aspect images); ``(bytes, ext, size)``."""
    from PIL import Image as PILImage

    from kelix.data.decode import DEFAULT_MAX_PIXELS, decode_image

    try:
        img = decode_image(data, opts.max_pixels or DEFAULT_MAX_PIXELS)
        fmt = PILImage.open(io.BytesIO(data)).format
    except SampleError as e:
        raise RowError(e.reason, f"{what}: {e}") from e
    except Exception as e:  # noqa: BLE001 - any decoder failure is one skipped row
        detail = "" if isinstance(e, PILImage.UnidentifiedImageError) else f": {e}"  # its text names a BytesIO
        raise RowError("corrupt_image", f"{what} cannot be decoded ({type(e).__name__}{detail})") from e
    w, h = img.size
    if opts.aspect_range is not None and not opts.aspect_range[0] <= w / h <= opts.aspect_range[1]:
        raise RowError("aspect_ratio", f"{what} {w}x{h} has aspect {w / h:.2f} outside "
                                       f"[{opts.aspect_range[0]}, {opts.aspect_range[1]}]")
    return data, PIL_EXT.get(fmt, "jpg"), (w, h)


def _column(row: dict, name: str | None, candidates: tuple[str, ...], what: str):
    if not isinstance(row, dict):
        raise RowError("schema", f"row is a {type(row).__name__}, not a record")
    if name is not None:
        if name not in row:
            raise RowError("schema", f"no column {name!r} (has: {', '.join(map(str, row)) or 'nothing'})")
        return row[name]
    for c in candidates:
        if c in row:
            return row[c]
    raise RowError("schema", f"no {what} column (tried {', '.join(candidates)}; has: {', '.join(map(str, row))}); "
                             f"name it with --{what}-column")


def _text(value, what: str = "text") -> str:
    if isinstance(value, list):  # COCO-style several captions: the first
        value = value[0] if value else None
    if not isinstance(value, str) or not value.strip():
        raise RowError("empty_text", f"{what} is empty")
    return value.strip()


def _record(row) -> dict:
    """A JSONL line (text) parsed here, so that a bad line is one skipped row."""
    if isinstance(row, str):
        try:
            row = json.loads(row)
        except json.JSONDecodeError as e:
            raise RowError("bad_json", f"not valid JSON: {e}") from e
    if not isinstance(row, dict):
        raise RowError("schema", f"record is a {type(row).__name__}, not an object")
    return row


def _source_id(meta: dict, row: dict) -> dict:
    if "id" in row:
        meta["source_id"] = str(row["id"])
    return meta


def _one_image(row: dict, opts: Options) -> tuple[str, bytes]:
    value = _column(row, opts.image_column, IMAGE_COLUMNS, "image")
    if isinstance(value, list):
        value = value[0] if value else None
    data, ext, _ = checked_image(image_data(value, opts), opts)
    return f"0.{ext}", data


# -- formats
def pairs(row, opts: Options):
    row = _record(row)
    caption = _text(_column(row, opts.text_column, TEXT_COLUMNS, "text"), "caption")
    name, data = _one_image(row, opts)
    meta = {"task": opts.task or "caption",
            "segments": [{"type": "image", "image": name}, {"type": "text", "text": caption}]}
    return _source_id(meta, row), {name: data}


def t2i(row, opts: Options):
    row = _record(row)
    prompt = _text(_column(row, opts.text_column, TEXT_COLUMNS, "text"), "prompt")
    name, data = _one_image(row, opts)
    meta = {"task": opts.task or "t2i", "messages": [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": [{"type": "image", "image": name}]}]}
    return _source_id(meta, row), {name: data}


def text(row, opts: Options):
    row = _record(row)
    doc = _text(_column(row, opts.text_column, ("text", "content", "document", "body"), "text"))
    return {"task": opts.task or "text", "segments": [{"type": "text", "text": doc}]}, {}


def _split_tags(value: str, next_image: list[int]) -> list[dict]:
    parts = []
    for j, chunk in enumerate(value.split(IMAGE_TAG)):
        if j > 0:
            parts.append({"type": "image", "image": next_image[0]})
            next_image[0] += 1
        if chunk.strip():
            parts.append({"type": "text", "text": chunk.strip("\n")})
    return parts


def _content(content, next_image: list[int], at: str) -> list[dict]:
    if isinstance(content, str):
        return _split_tags(content, next_image)
    if not isinstance(content, list):
        raise RowError("schema", f"{at} is a {type(content).__name__}, not text or a list of parts")
    parts = []
    for i, p in enumerate(content):  # OpenAI / HF chat parts: {"type": "text"|"image"|"image_url", ...}
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            parts.extend(_split_tags(str(p.get("text", "")), next_image))
        elif kind in ("image", "image_url"):
            parts.append({"type": "image", "image": next_image[0]})
            next_image[0] += 1
        else:
            raise RowError("schema", f"{at}[{i}] is not a text or image part")
    return parts


def chat_layout(row: dict, images: list) -> list[dict]:
    """Turns -> kit ``messages`` whose image parts hold the image's index in ``images`` (an int)."""
    turns = row.get("conversations", row.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise RowError("schema", "'conversations' (or 'messages') must be a non-empty list")
    next_image, messages = [0], []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RowError("schema", f"conversations[{i}] is not an object")
        who = t.get("from", t.get("role"))
        role = ROLE.get(who)
        if role is None:
            raise RowError("schema", f"conversations[{i}] speaker {who!r} is not one of {', '.join(ROLE)}")
        content = t["value"] if "value" in t else t.get("content", "")
        messages.append({"role": role, "content": _content(content, next_image, f"conversations[{i}]")})
    placed = next_image[0]
    if placed > len(images):
        raise RowError("schema", f"{placed} <image> marker(s) but {len(images)} image(s)")
    if placed < len(images):
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise RowError("schema", "images but no user turn to put them in")
        first_user["content"][:0] = [{"type": "image", "image": k} for k in range(placed, len(images))]
    return messages


def chat(row, opts: Options):
    """LLaVA / ShareGPT ``conversations`` (``from``/``value``) or ``messages`` (``role``/``content``);
    ``<image>`` (or an image part) marks where each image goes; unmarked images go before the first
    user text, as LLaVA does."""
    row = _record(row)
    images = row.get("images", row.get("image")) if opts.image_column is None else row.get(opts.image_column)
    images = [] if images is None else [images] if not isinstance(images, list) else images
    messages = chat_layout(row, images)
    files, names = {}, {}
    for k, value in enumerate(images):
        data, ext, _ = checked_image(image_data(value, opts, f"image {k}"), opts, f"image {k}")
        names[k] = f"{k}.{ext}"
        files[names[k]] = data
    for m in messages:
        for p in m["content"]:
            if p["type"] == "image":
                p["image"] = names[p["image"]]
        if not m["content"]:
            m["content"] = ""
    if not any(m["content"] for m in messages):
        raise RowError("empty_text", "every turn is empty")
    meta = {"task": opts.task or ("vqa" if images else "chat"), "messages": messages}
    return _source_id(meta, row), files


def obelics(row, opts: Options):
    """OBELICS-style documents: parallel ``texts`` and ``images`` lists, one of the two set per position."""
    row = _record(row)
    texts, images = row.get("texts"), row.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise RowError("schema", "'texts' and 'images' must be lists of the same length")
    segments, files = [], {}
    for i, (t, im) in enumerate(zip(texts, images)):
        if im is not None:
            data, ext, _ = checked_image(image_data(im, opts, f"images[{i}]"), opts, f"images[{i}]")
            name = f"{len(files)}.{ext}"
            files[name] = data
            segments.append({"type": "image", "image": name})
        elif isinstance(t, str) and t.strip():
            segments.append({"type": "text", "text": t})
    if not any(s["type"] == "text" for s in segments):
        raise RowError("empty_text", "the document has no text")
    return {"task": opts.task or "interleaved", "segments": segments}, files


def img2dataset(raw, opts: Options):
    """A sample of an img2dataset tar (``{key}.jpg`` + ``{key}.txt`` [+ ``{key}.json``])."""
    if "__error__" in raw:
        raise RowError(*raw["__error__"])
    exts = [k for k in raw if k in (*PIL_EXT.values(), "jpeg", "tiff")]
    if not exts:
        raise RowError("missing_image", f"sample {raw['__key__']!r} has no image member")
    data, ext, _ = checked_image(raw[exts[0]], opts)
    try:
        caption = raw["txt"].decode("utf-8") if "txt" in raw else json.loads(raw.get("json", b"{}")).get("caption")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise RowError("bad_json", f"sample {raw['__key__']!r}: caption cannot be read ({e})") from e
    caption = _text(caption, "caption")
    meta = {"task": opts.task or "caption", "source_id": raw["__key__"],
            "segments": [{"type": "image", "image": f"0.{ext}"}, {"type": "text", "text": caption}]}
    return meta, {f"0.{ext}": data}


def hf(row, opts: Options):
    """A row of a ``datasets`` save_to_disk dataset, read by the format ``hf_as`` (or guessed from its columns)."""
    fmt = opts.hf_as
    if fmt is None:
        if "conversations" in row or "messages" in row:
            fmt = "llava"
        elif "texts" in row and "images" in row:
            fmt = "obelics"
        elif opts.image_column in row or any(c in row for c in IMAGE_COLUMNS):
            fmt = "t2i" if opts.task == "t2i" else "pairs"
        else:
            fmt = "text"
    return FORMATS[fmt](row, opts)


def sanitize(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


FORMATS = {"pairs": pairs, "t2i": t2i, "text": text, "llava": chat, "sharegpt": chat, "messages": chat,
           "obelics": obelics, "img2dataset": img2dataset, "hf": hf}
