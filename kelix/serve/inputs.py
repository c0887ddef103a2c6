"""Request images: data URLs always; http(s) URLs and local files only when the server allows them.

Every image goes through :func:`kelix.data.decode.decode_image`, which refuses an image over
``max_image_pixels`` from its header, before a pixel is decoded (the data layer's decompression-bomb
bound). Errors name the request field (``messages[0].content[1].image_url``).
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse
import urllib.request

from kelix.data.decode import decode_image
from kelix.data.schema import SampleError
from kelix.serve.protocol import APIError, ChatMessage

DATA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")
URL_TIMEOUT_S = 10.0


def _data_url(url: str, param: str) -> bytes:
    head, sep, payload = url.partition(",")
    media = head[len("data:"):].split(";")
    if not sep or "base64" not in media[1:]:
        raise APIError(400, f"{param}: a data URL must be base64 (data:image/png;base64,...)", param)
    if media[0].lower() not in DATA_TYPES:
        raise APIError(400, f"{param}: media type {media[0]!r} is not one of {', '.join(DATA_TYPES)}", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data URL's base64 is invalid", param) from None


def _fetch(url: str, cfg, param: str) -> bytes:
    if not cfg.allow_url_images:
        raise APIError(400, f"{param}: image URLs are not fetched by this server (start it with "
                       "--allow-url-images), send the image as a data URL", param)
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as r:  # noqa: S310 - http(s) only, checked
            data = r.read(cfg.max_body_bytes + 1)
    except OSError as e:
        raise APIError(400, f"{param}: cannot fetch the image: {e}", param) from None
    if len(data) > cfg.max_body_bytes:
        raise APIError(413, f"{param}: the image is over {cfg.max_body_bytes} bytes", param)
    return data


def _local(path: str, cfg, param: str) -> bytes:
    if cfg.allow_local_files is None:
        raise APIError(400, f"{param}: local files are not read by this server (start it with "
                       "--allow-local-files DIR), send the image as a data URL", param)
    root = os.path.realpath(cfg.allow_local_files)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise APIError(403, f"{param}: {path!r} is outside the allowed directory", param, code="forbidden_path")
    if not os.path.isfile(real):
        raise APIError(400, f"{param}: {path!r} is not a file", param)
    if os.path.getsize(real) > cfg.max_body_bytes:
        raise APIError(413, f"{param}: {path!r} is over {cfg.max_body_bytes} bytes", param)
    with open(real, "rb") as f:
        return f.read()


def load_image(url: str, cfg, param: str):
    """The RGB PIL image an ``image_url`` names (refused with an :class:`APIError` naming ``param``)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "data":
        data = _data_url(url, param)
    elif scheme in ("http", "https"):
        data = _fetch(url, cfg, param)
    elif scheme == "file":
        data = _local(urllib.parse.unquote(urllib.parse.urlsplit(url).path), cfg, param)
    elif scheme == "" or len(scheme) == 1:  # a path (or a Windows drive letter)
        data = _local(url, cfg, param)
    else:
        raise APIError(400, f"{param}: URL scheme {scheme!r} is not supported (data:, http(s): or a file)", param)
    try:
        return decode_image(data, max_pixels=cfg.max_image_pixels, where=param)
    except SampleError as e:
        raise APIError(400, f"{param}: {e}", param, code=getattr(e, "reason", None)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a damaged file
        raise APIError(400, f"{param}: not a readable image ({type(e).__name__})", param) from None


def read_messages(messages: list[ChatMessage], cfg) -> tuple[list[tuple[str, list]], list]:
    """Messages -> turns ``[(role, [text | image index])]`` and their PIL images, in order."""
    turns, images = [], []
    count = sum(1 for m in messages if isinstance(m.content, list) for p in m.content if p.type == "image_url")
    if count > cfg.max_images:
        raise APIError(400, f"messages: {count} images, over this server's limit of {cfg.max_images} per request",
                       "messages", code="too_many_images")
    for i, m in enumerate(messages):
        parts = [m.content] if isinstance(m.content, str) else []
        for j, p in enumerate(m.content if isinstance(m.content, list) else []):
            where = f"messages[{i}].content[{j}]"
            if p.type == "text":
                if p.text is None:
                    raise APIError(400, f"{where}.text is missing", f"{where}.text")
                parts.append(p.text)
            else:
                if p.image_url is None:
                    raise APIError(400, f"{where}.image_url is missing", f"{where}.image_url")
                images.append(load_image(p.image_url.url, cfg, f"{where}.image_url"))
                parts.append(len(images) - 1)
        turns.append((m.role, parts))
    return turns, images
