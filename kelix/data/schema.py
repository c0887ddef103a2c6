"""The one sample schema shared by every task (see docs/architecture.md, "The sample schema").

A shard sample is ``{key}.json`` plus the images it names (``{key}.0.jpg``...) and, optionally,
pre-tokenized code grids (``{key}.0.codes.npy``). The JSON holds either

* ``messages``: chat turns ``{"role", "content"}``; content is a string or a list of parts
  ``{"type": "text", "text": ...}`` / ``{"type": "image", "image": "0.jpg"}``, or
* ``segments``: interleaved parts without roles (pretraining data).

img2dataset shards (``{key}.jpg`` + ``{key}.txt``) are read as captions without conversion.
``parse_sample`` turns decoded fields into a :class:`Sample` or raises :class:`SampleError` whose
message is one line naming shard, key and field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ROLES = ("system", "user", "assistant")
TASKS = ("caption", "ocr", "vqa", "t2i", "interleaved", "text", "chat")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CODES_SUFFIX = "codes.npy"


class SampleError(ValueError):
    """A sample that cannot be used; the message names shard, key and field.

    ``reason`` is a short counter name (``bad_json``, ``missing_image``...) used for the skip
    statistics logged to TensorBoard.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Image:
    """One image of a sample: pixels, pre-computed codes ``[h, w, N]``, or both."""

    name: str
    pixels: Any = None  # PIL.Image.Image (RGB)
    codes: Any = None  # numpy integer array [h, w, N]


@dataclass
class Part:
    type: Literal["text", "image"]
    text: str = ""
    image: Image | None = None


@dataclass
class Turn:
    role: str | None  # None for `segments` data
    parts: list[Part]

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if p.type == "text")


@dataclass
class Sample:
    key: str
    shard: str
    kind: Literal["messages", "segments"]
    turns: list[Turn]
    task: str = "chat"
    meta: dict = field(default_factory=dict)
    # Other ``*.npy`` fields of the sample by name without the key (``"cond.npy"``, ``"latent.npy"``):
    # pre-computed model inputs such as the DiT's condition states and target latents.
    arrays: dict = field(default_factory=dict)

    @property
    def images(self) -> list[Image]:
        return [p.image for t in self.turns for p in t.parts if p.type == "image"]


def image_stem(name: str) -> str:
    """``"0.jpg"`` -> ``"0"``; the stem links an image name to its ``0.codes.npy``.

    img2dataset's single image is the field ``"jpg"`` (file ``{key}.jpg``): its stem is ``""``,
    matching ``{key}.codes.npy``.
    """
    return name.split(".", 1)[0] if "." in name else ""


def _where(shard: str, key: str) -> str:
    return f"{shard}:{key}"


def _parse_parts(content: Any, path: str, where: str, resolve) -> list[Part]:
    if isinstance(content, str):
        return [Part("text", text=content)]
    if not isinstance(content, list):
        raise SampleError("schema", f"{where}: {path} must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for i, p in enumerate(content):
        at = f"{path}[{i}]"
        if not isinstance(p, dict) or "type" not in p:
            raise SampleError("schema", f"{where}: {at} must be an object with a 'type'")
        if p["type"] == "text":
            if not isinstance(p.get("text"), str):
                raise SampleError("schema", f"{where}: {at}.text must be a string")
            parts.append(Part("text", text=p["text"]))
        elif p["type"] == "image":
            name = p.get("image")
            if not isinstance(name, str) or not name:
                raise SampleError("schema", f"{where}: {at}.image must name a file of the sample, e.g. '0.jpg'")
            parts.append(Part("image", image=resolve(name, at)))
        else:
            raise SampleError("schema", f"{where}: {at}.type {p['type']!r} is not 'text' or 'image'")
    return parts


def parse_sample(fields: dict[str, Any], shard: str = "?", key: str = "?") -> Sample:
    """Build a :class:`Sample` from decoded shard fields (``json``, ``txt``, ``0.jpg``, ``0.codes.npy``...).

    Image fields must already be decoded (PIL images) and ``*.codes.npy`` loaded as arrays.
    """
    where = _where(shard, key)
    images = {k: v for k, v in fields.items() if k.rsplit(".", 1)[-1] in IMAGE_EXTS}
    codes = {k[: -len(CODES_SUFFIX) - 1]: v for k, v in fields.items() if k.endswith(CODES_SUFFIX)}
    arrays = {k: v for k, v in fields.items() if k.endswith(".npy") and not k.endswith(CODES_SUFFIX)}

    def resolve(name: str, at: str) -> Image:
        stem = image_stem(name)
        pixels = images.get(name)
        if pixels is None:  # allow "0.jpg" to match "0.png" (converted shards)
            pixels = next((v for k, v in images.items() if image_stem(k) == stem), None)
        img = Image(name=name, pixels=pixels, codes=codes.get(stem))
        if img.pixels is None and img.codes is None:
            have = sorted(set(images) | {f"{s}.{CODES_SUFFIX}" for s in codes}) or ["nothing"]
            raise SampleError(
                "missing_image", f"{where}: {at} names image {name!r}, not in the sample (has: {', '.join(have)})"
            )
        return img

    meta = fields.get("json")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise SampleError("schema", f"{where}: json must be an object, got {type(meta).__name__}")
    task = meta.get("task")
    if task is not None and task not in TASKS:
        raise SampleError("schema", f"{where}: json.task {task!r} is not one of {', '.join(TASKS)}")

    if "messages" in meta:
        msgs = meta["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise SampleError("schema", f"{where}: json.messages must be a non-empty list")
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise SampleError("schema", f"{where}: json.messages[{i}] must be an object")
            role = m.get("role")
            if role not in ROLES:
                raise SampleError("schema", f"{where}: json.messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
            if "content" not in m:
                raise SampleError("schema", f"{where}: json.messages[{i}].content is missing")
            turns.append(Turn(role, _parse_parts(m["content"], f"json.messages[{i}].content", where, resolve)))
        return Sample(key, shard, "messages", turns, task or "chat", meta, arrays)

    if "segments" in meta:
        parts = _parse_parts(meta["segments"], "json.segments", where, resolve)
        if not parts:
            raise SampleError("schema", f"{where}: json.segments is empty")
        return Sample(key, shard, "segments", [Turn(None, parts)], task or "interleaved", meta, arrays)

    # img2dataset layout: {key}.jpg + {key}.txt (+ {key}.json with metadata only).
    caption = fields.get("txt")
    if caption is None and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    if caption is not None and (images or "" in codes):
        single = sorted(k for k in images if "." not in k)
        name = single[0] if single else (sorted(images)[0] if images else "jpg")
        parts = [Part("image", image=resolve(name, "image")), Part("text", text=caption)]
        return Sample(key, shard, "segments", [Turn(None, parts)], task or "caption", meta, arrays)
    if caption is not None:
        return Sample(key, shard, "segments", [Turn(None, [Part("text", text=caption)])], task or "text", meta, arrays)
    raise SampleError("schema", f"{where}: json has neither 'messages' nor 'segments', and no image+txt caption pair")
